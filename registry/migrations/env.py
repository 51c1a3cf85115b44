"""Alembic environment: runs against the engine that ``registry.db`` passes in."""

from __future__ import annotations

from alembic import context
from sqlmodel import SQLModel

import loraflow.registry.models  # noqa: F401  (registers the tables on SQLModel.metadata)

config = context.config
engine = config.attributes.get("engine")
if engine is None:  # invoked by the alembic CLI, e.g. for `alembic revision --autogenerate`
    from loraflow.registry.db import make_engine
    from loraflow.registry.settings import load_settings

    engine = make_engine(load_settings().resolved_database_url)

with engine.connect() as connection:
    context.configure(
        connection=connection,
        target_metadata=SQLModel.metadata,
        render_as_batch=connection.dialect.name == "sqlite",
    )
    with context.begin_transaction():
        context.run_migrations()
