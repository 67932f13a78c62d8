"""Alembic environment: kvstore runs it in-process with a connection of its own (see kvstore.index.db)."""

from alembic import context
from sqlalchemy import create_engine

from kvstore.index.schema import metadata

config = context.config


def run() -> None:
    connection = config.attributes.get("connection")
    if connection is None:  # `alembic` from a shell: use the URL in the config
        engine = create_engine(config.get_main_option("sqlalchemy.url"))
        with engine.connect() as connection:
            _migrate(connection)
    else:
        _migrate(connection)


def _migrate(connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=metadata,
        render_as_batch=True,  # SQLite cannot ALTER most things; batch mode copies the table
        transactional_ddl=True,  # each migration commits together with its version row
        transaction_per_migration=True,
    )
    with context.begin_transaction():
        context.run_migrations()


run()
