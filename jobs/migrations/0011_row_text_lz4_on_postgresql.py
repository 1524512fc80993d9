"""On PostgreSQL, compress the rows' transcripts with lz4 instead of pglz.

A 5,000-transcript start (107 MB) spent about two seconds in pglz, which
compresses several times slower. Only values written afterwards change;
a server built without lz4 keeps pglz. SQLite has no such setting."""

from django.db import DatabaseError, migrations, transaction

LZ4_COLUMNS = (("jobs_extractrow", "data"), ("jobs_extractrow", "raw_answer"))


def use_lz4(apps, schema_editor):
    if schema_editor.connection.vendor != "postgresql":
        return
    for table, column in LZ4_COLUMNS:
        try:
            with transaction.atomic(using=schema_editor.connection.alias):
                schema_editor.execute(f'ALTER TABLE "{table}" ALTER COLUMN "{column}" SET COMPRESSION lz4')
        except DatabaseError:
            return  # built without lz4


def use_the_default(apps, schema_editor):
    if schema_editor.connection.vendor != "postgresql":
        return
    for table, column in LZ4_COLUMNS:
        schema_editor.execute(f'ALTER TABLE "{table}" ALTER COLUMN "{column}" SET COMPRESSION DEFAULT')


class Migration(migrations.Migration):
    dependencies = [
        ("jobs", "0010_worker_slots_replace_claim_waiter"),
    ]

    operations = [migrations.RunPython(use_lz4, use_the_default)]
