from django.core.management import call_command
from django.db import migrations


def create_cache_table(apps, schema_editor):
    # The throttle's shared cache (settings.CACHES) lives in this database.
    call_command("createcachetable", database=schema_editor.connection.alias, verbosity=0)


class Migration(migrations.Migration):
    dependencies = [("jobs", "0004_sweep_schedule")]

    operations = [migrations.RunPython(create_cache_table, migrations.RunPython.noop)]
