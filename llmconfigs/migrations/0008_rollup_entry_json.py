from django.db import migrations, models

BATCH = 2000


def fill_entry_json(apps, schema_editor):
    """Every existing rollup row's `entry_json` from its `packed` value, error category and currency, in batches of
    rows by id. Written by llmconfigs.usage.rollup_entry_json, as the rollup writes it: the text must be what a report
    writes for the row (a later change of that text needs a migration that fills the column again)."""
    from llmconfigs.usage import rollup_entry_json

    connection = schema_editor.connection
    table = connection.ops.quote_name(apps.get_model("llmconfigs", "UsageRollup")._meta.db_table)
    last = 0
    with connection.cursor() as cursor:
        while True:
            cursor.execute(f"SELECT id, error_category, currency, packed FROM {table} WHERE id > %s ORDER BY id "
                           f"LIMIT {BATCH}", [last])
            rows = cursor.fetchall()
            if not rows:
                return
            cursor.executemany(f"UPDATE {table} SET entry_json = %s WHERE id = %s", [
                (rollup_entry_json(error_category=category, currency=currency, packed=bytes(packed)), row_id)
                for row_id, category, currency, packed in rows
            ])
            last = rows[-1][0]


class Migration(migrations.Migration):

    dependencies = [
        ('llmconfigs', '0007_rollup_packed'),
    ]

    operations = [
        migrations.AddField(
            model_name='usagerollup',
            name='entry_json',
            field=models.TextField(default='', editable=False),
        ),
        migrations.RunPython(fill_entry_json, migrations.RunPython.noop),
    ]
