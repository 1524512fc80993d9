from django.db import migrations
from django.utils import timezone

# A frozen copy of services.ensure_sweep_schedule: migrations must not
# change when application code does.


def create_sweep_schedule(apps, schema_editor):
    apps.get_model("django_q", "Schedule").objects.update_or_create(
        name="stringsight-sweep",
        defaults={
            "func": "jobs.tasks.sweep",
            "schedule_type": "I",  # every `minutes` minutes
            "minutes": 1,
            "repeats": -1,
            "next_run": timezone.now(),
        },
    )


def delete_sweep_schedule(apps, schema_editor):
    apps.get_model("django_q", "Schedule").objects.filter(name="stringsight-sweep").delete()


class Migration(migrations.Migration):
    dependencies = [
        ("jobs", "0003_leases_and_sweep"),
        ("django_q", "0019_alter_task_options_alter_ormq_key_alter_ormq_lock_and_more"),
    ]

    operations = [migrations.RunPython(create_sweep_schedule, delete_sweep_schedule)]
