"""The `locator` command line: the only module that imports both the API and the feeds."""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, Protocol

import click
from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from locator.config import Settings, is_loopback
from locator.logs import configure_logging
from locator.store import migrate
from locator.store.db import create_db_engine, make_session_factory, transaction
from locator.trusts import (
    TrustFileError,
    TrustRegistry,
    example_trusts,
    load_registry,
    load_trusts_file,
    read_trusts,
    store_trusts,
)

log = logging.getLogger("locator")


class Listener(Protocol):
    """A running feed listener: its ports by label (`mllp`, `mllp.RZZ01`, `dicom`)."""

    ports: dict[str, int]

    async def stop(self) -> None: ...


class StartupError(click.ClickException):
    """The service cannot start as configured; the message says why."""


def _settings(**overrides: Any) -> Settings:
    return Settings(**{k: v for k, v in overrides.items() if v is not None})


db_option = click.option("--db", "database_url", help="Database URL (LOCATOR_DATABASE_URL).")


@click.group()
@click.version_option(package_name="locator")
def main() -> None:
    """The locator: which trust holds which imaging studies, per NHS Number."""


# --------------------------------------------------------------------------- db


@main.group()
def db() -> None:
    """Database schema."""


@db.command("upgrade")
@db_option
def db_upgrade(database_url: str | None) -> None:
    """Apply the Alembic migrations up to head."""
    settings = _settings(database_url=database_url)
    engine = create_db_engine(settings.database_url)
    migrate.upgrade(engine)
    click.echo(f"database at revision {migrate.current_revision(engine)}")
    engine.dispose()


def prepare_database(settings: Settings) -> Engine:
    """SQLite is migrated on start; PostgreSQL must already be (`locator db upgrade`)."""
    engine = create_db_engine(settings.database_url, pool_size=settings.db_pool_size)
    if settings.is_sqlite:
        migrate.upgrade(engine)
    elif migrate.current_revision(engine) != migrate.head_revision():
        raise StartupError(
            "the PostgreSQL schema is not at the current revision: run `locator db upgrade`"
        )
    return engine


# --------------------------------------------------------------------------- trusts


@main.group()
def trusts() -> None:
    """The trust registry."""


@trusts.command("load")
@click.argument("file", type=click.Path(path_type=Path))
@db_option
def trusts_load(file: Path, database_url: str | None) -> None:
    """Insert or update the trusts of a TOML file."""
    engine = prepare_database(_settings(database_url=database_url))
    try:
        loaded = load_trusts_file(file)
        with transaction(make_session_factory(engine)) as session:
            store_trusts(session, trusts=loaded)
    except TrustFileError as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(f"loaded {len(loaded)} trust(s): {', '.join(t.ods_code for t in loaded)}")


@trusts.command("list")
@db_option
def trusts_list(database_url: str | None) -> None:
    """List the registered trusts and their feed identities."""
    engine = prepare_database(_settings(database_url=database_url))
    with make_session_factory(engine)() as session:
        rows = read_trusts(session)
    for t in rows:
        click.echo(f"{t.ods_code}\t{t.name}")
        click.echo(f"\tHL7 facilities: {', '.join(t.hl7_sending_facilities) or '-'}")
        click.echo(f"\tDICOM AE titles: {', '.join(t.dicom_ae_titles) or '-'}")
        click.echo(f"\tviewer: {t.viewer_url}")
        click.echo(f"\tDICOMweb: {t.dicomweb_url}")
        if t.mllp_port is not None:
            click.echo(f"\tdedicated MLLP port: {t.mllp_port}")
    if not rows:
        click.echo("no trusts registered")


def prepare_registry(settings: Settings, factory: sessionmaker[Session]) -> TrustRegistry:
    with transaction(factory) as session:
        if settings.trusts_file is not None:
            store_trusts(session, trusts=load_trusts_file(settings.trusts_file))
        elif not read_trusts(session) and (settings.is_sqlite or settings.demo_trusts):
            store_trusts(session, trusts=example_trusts())
            log.info("stored the example trusts (RZZ01..RZZ03) in the empty registry")
        registry = load_registry(session)
    if not len(registry):
        log.warning("the trust registry is empty: every feed message will be refused")
    return registry


@main.command()
@db_option
def quarantine(database_url: str | None) -> None:
    """List studies held back because their patient assertions conflict."""
    from locator.core.index import list_quarantined

    engine = prepare_database(_settings(database_url=database_url))
    with make_session_factory(engine)() as session:
        entries = list_quarantined(session)
    for q in entries:
        click.echo(
            f"{q.study_id}\t{q.trust_ods}\tuid={q.study_uid or '-'}\tacc={q.accession or '-'}"
        )
        for source, claim in q.claims:
            click.echo(f"\t{source} asserts {claim}")
    click.echo(f"{len(entries)} quarantined stud{'y' if len(entries) == 1 else 'ies'}")


# --------------------------------------------------------------------------- serve


def check_exposure(settings: Settings, roles: set[str]) -> None:
    """Open mode only on loopback (interface.md, Security)."""
    http_host = settings.listener_host("http")
    if "api" in roles and not settings.jwks and not is_loopback(http_host):
        raise StartupError(
            f"refusing to serve the API on {http_host} without --jwks: open mode is loopback only"
        )
    if (
        "api" in roles
        and settings.jwks
        and not is_loopback(http_host)
        and not (settings.jwt_issuer and settings.jwt_audience)
    ):
        raise StartupError("--issuer and --audience are required when the API is not on loopback")
    for role in plain_feed_roles(settings, roles):
        if not settings.allow_plain_feeds:
            host = settings.listener_host(role)  # type: ignore[arg-type]
            raise StartupError(
                f"refusing a plain {role.upper()} listener on {host}: configure TLS "
                f"(LOCATOR_{role.upper()}_TLS_*) or pass --allow-plain-feeds with trusts' "
                "source_addresses"
            )


def plain_feed_roles(settings: Settings, roles: set[str]) -> list[str]:
    """Feed listeners bound beyond loopback without TLS."""
    tls = {"mllp": settings.mllp_tls_cert, "dicom": settings.dicom_tls_cert}
    return [
        role
        for role in ("mllp", "dicom")
        if role in roles and tls[role] is None and not is_loopback(settings.listener_host(role))
    ]


def check_plain_feed_trusts(settings: Settings, roles: set[str], registry: TrustRegistry) -> None:
    """--allow-plain-feeds holds only together with every trust's source_addresses
    (interface.md, Security): a plain feed must still know who may speak for whom."""
    plain = plain_feed_roles(settings, roles)
    unbound = sorted(t.ods_code for t in registry if not t.source_addresses)
    if plain and unbound:
        raise StartupError(
            f"plain {'/'.join(r.upper() for r in plain)} beyond loopback: --allow-plain-feeds "
            f"needs source_addresses for every trust; missing for {', '.join(unbound)}"
        )


def bound_socket(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(1024)
    sock.setblocking(False)
    return sock


class ApiListener:
    """uvicorn serving the FastAPI app on a socket we bound (so port 0 can be reported)."""

    def __init__(self, app: Any, sock: socket.socket, settings: Settings) -> None:
        import uvicorn

        config = uvicorn.Config(
            app,
            log_config=None,
            access_log=False,  # locator.api.middleware writes a masked access log
            lifespan="off",
            timeout_graceful_shutdown=10,
        )
        self.server = uvicorn.Server(config)
        self.sock = sock
        self.ports = {"http": sock.getsockname()[1]}
        self.task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self.task = asyncio.create_task(self.server.serve(sockets=[self.sock]))
        while not self.server.started:
            if self.task.done():
                self.task.result()
            await asyncio.sleep(0.01)

    async def stop(self) -> None:
        self.server.should_exit = True
        if self.task is not None:
            await self.task


async def start_listeners(
    settings: Settings, engine: Engine, factory: sessionmaker[Session], registry: TrustRegistry
) -> list[Listener]:
    roles = roles_of(settings)
    listeners: list[Listener] = []
    if "api" in roles:
        from locator.api.app import create_app

        app = create_app(settings, engine=engine, session_factory=factory, registry=registry)
        api = ApiListener(
            app, bound_socket(settings.listener_host("http"), settings.http_port), settings
        )
        await api.start()
        listeners.append(api)
        listeners.append(await start_deliverer(settings, engine, registry))
    if "mllp" in roles:
        from ingest.hl7_listener import start_mllp

        listeners.append(await start_mllp(settings, session_factory=factory, registry=registry))
    if "dicom" in roles:
        from ingest.dicom_listener import start_dicom

        listeners.append(await start_dicom(settings, session_factory=factory, registry=registry))
    return listeners


async def start_deliverer(settings: Settings, engine: Engine, registry: TrustRegistry) -> Listener:
    """The subscriptions' deliverer runs beside each API (one of them delivers: a lease)."""
    from locator.api.subscriptions import study_reader
    from locator.notify.deliverer import Deliverer

    deliverer = Deliverer(settings, engine=engine, read_studies=study_reader(registry))
    await deliverer.start()
    return deliverer


def announce(settings: Settings, listeners: list[Listener]) -> None:
    # One write per line: stderr's log records share the terminal (or pipe) with these lines,
    # and print() writes the text and its newline separately.
    for listener in listeners:
        for label, port in listener.ports.items():
            sys.stdout.write(f"{label}={port}\n")
            sys.stdout.flush()
    ports = {k: v for li in listeners for k, v in li.ports.items()}
    if "http" in ports:
        base = f"http://{settings.listener_host('http')}:{ports['http']}/fhir"
        print(f"FHIR API: {base}  (clinicians' page: {base[:-5]}/)", flush=True)
        print(
            f"try: curl -s -X POST {base}/ImagingStudy/_search "
            "--data-urlencode 'patient.identifier=https://fhir.nhs.uk/Id/nhs-number|<nhs-number>'",
            flush=True,
        )
    if "mllp" in ports and "dicom" in ports:
        print(
            f"demo: locator demo --mllp-port {ports['mllp']} --dicom-port {ports['dicom']}"
            + (f" --http-port {ports['http']}" if "http" in ports else ""),
            flush=True,
        )
    if not settings.jwks and "http" in ports:
        log.warning("OPEN MODE: no --jwks, the API answers anyone who can reach loopback")


def roles_of(settings: Settings) -> set[str]:
    return {settings.only} if settings.only else {"api", "mllp", "dicom"}


async def run_service(settings: Settings) -> None:
    roles = roles_of(settings)
    check_exposure(settings, roles)
    engine = prepare_database(settings)
    factory = make_session_factory(engine)
    try:
        registry = prepare_registry(settings, factory)
    except TrustFileError as exc:
        raise StartupError(str(exc)) from exc
    check_plain_feed_trusts(settings, roles, registry)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    listeners = await start_listeners(settings, engine, factory, registry)
    announce(settings, listeners)
    await stop.wait()
    log.info("stopping: listeners close, in-flight messages finish")
    # Feeds first (no new messages, in-flight ones finish and are acknowledged), API last.
    for listener in reversed(listeners):
        await listener.stop()
    engine.dispose()
    log.info("stopped")


def _serve_options(func: Callable[..., Any]) -> Callable[..., Any]:
    options = [
        db_option,
        click.option("--trusts", "trusts_file", type=click.Path(path_type=Path)),
        click.option("--demo-trusts", is_flag=True, default=None),
        click.option("--host"),
        click.option("--http-host"),
        click.option("--mllp-host"),
        click.option("--dicom-host"),
        click.option("--http-port", type=int),
        click.option("--mllp-port", type=int),
        click.option("--dicom-port", type=int),
        click.option("--dicom-ae"),
        click.option("--only", type=click.Choice(["api", "mllp", "dicom"])),
        click.option("--jwks"),
        click.option("--issuer", "jwt_issuer"),
        click.option("--audience", "jwt_audience"),
        click.option("--accept-test-nhs-numbers/--no-accept-test-nhs-numbers", default=None),
        click.option("--cursor-secret"),
        click.option("--allow-plain-feeds", is_flag=True, default=None),
        click.option("--log-level"),
    ]
    for option in reversed(options):
        func = option(func)
    return func


@main.command()
@_serve_options
def serve(**options: Any) -> None:
    """Run the FHIR API, the MLLP listener and the DICOM MPPS listener."""
    settings = _settings(**options)
    configure_logging(settings.log_level)
    try:
        _run(run_service(settings))
    except StartupError as exc:
        log.error("%s", exc.message)
        sys.exit(2)


def _run(coro: Awaitable[None]) -> None:
    try:
        import uvloop

        uvloop.run(coro)  # type: ignore[arg-type]
    except ImportError:
        asyncio.run(coro)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- openapi


@main.command()
def openapi() -> None:
    """Print the OpenAPI document (the committed copy is openapi/openapi.json)."""
    from locator.api.app import openapi_document

    click.echo(openapi_document())


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="Where `serve` runs.")
@click.option("--mllp-port", default=2575, show_default=True)
@click.option("--dicom-port", default=11112, show_default=True)
@click.option("--dicom-ae", default="LOCATOR", show_default=True, help="The MPPS SCP's AE title.")
@click.option("--http-port", default=8080, show_default=True, help="Only to print the page URL.")
def demo(host: str, mllp_port: int, dicom_port: int, dicom_ae: str, http_port: int) -> None:
    """Feed sample ORU and MPPS through a running `serve`'s real listeners."""
    from ingest.demo import DemoError, patient_lines, run_demo

    try:
        result = run_demo(
            host=host, mllp_port=mllp_port, dicom_port=dicom_port, dicom_ae=dicom_ae, say=click.echo
        )
    except DemoError as exc:
        raise click.ClickException(f"{exc} (is `locator serve` running?)") from exc
    click.echo(f"sent: {result.mpps_steps} MPPS steps, {result.messages_accepted} ORU accepted")
    for refused in result.messages_refused:
        click.echo(f"refused: {refused}", err=True)
    click.echo(f"open http://{host}:{http_port}/ and try these NHS Numbers:")
    for line in patient_lines():
        click.echo(line)
    if result.messages_refused:
        sys.exit(1)


# --------------------------------------------------------------------------- journal, replay


@main.command("journal")
@db_option
@click.option("--trust", "trust_ods", help="Only this trust (ODS code).")
@click.option(
    "--outcome",
    "outcomes",
    multiple=True,
    type=click.Choice(["accepted", "duplicate", "error", "rejected"]),
)
@click.option("--since", help="ISO date/time (UTC unless an offset is given) or an age: 24h, 7d.")
@click.option("--limit", default=50, show_default=True, type=click.IntRange(min=1))
@click.option("--show", "show_id", type=int, help="One entry's stored copy, field by field.")
def journal_command(
    database_url: str | None,
    trust_ods: str | None,
    outcomes: tuple[str, ...],
    since: str | None,
    limit: int,
    show_id: int | None,
) -> None:
    """Inbound messages by trust, outcome and time, with refusal reasons."""
    from ingest.replay import describe_entry, journal_lines, parse_since

    engine = prepare_database(_settings(database_url=database_url))
    factory = make_session_factory(engine)
    try:
        lines = (
            describe_entry(factory, entry_id=show_id)
            if show_id is not None
            else journal_lines(
                factory,
                trust_ods=trust_ods,
                outcomes=outcomes,
                since=parse_since(since),
                limit=limit,
            )
        )
    except ValueError as exc:
        raise click.ClickException(str(exc)) from exc
    finally:
        engine.dispose()
    for line in lines:
        click.echo(line)


@main.command("replay")
@db_option
@click.option(
    "--status",
    "statuses",
    multiple=True,
    type=click.Choice(["error", "rejected"]),
    help="Which entries (default: both).",
)
@click.option("--accept-test-nhs-numbers/--no-accept-test-nhs-numbers", default=None)
def replay_command(
    database_url: str | None, statuses: tuple[str, ...], accept_test_nhs_numbers: bool | None
) -> None:
    """Re-process journaled error/rejected messages after a configuration fix."""
    from ingest.replay import entries_to_replay, replay_entries

    settings = _settings(database_url=database_url, accept_test_nhs_numbers=accept_test_nhs_numbers)
    engine = prepare_database(settings)
    factory = make_session_factory(engine)
    try:
        with factory() as session:
            registry = load_registry(session)
        entries = entries_to_replay(factory, outcomes=statuses)
        with click.progressbar(length=len(entries), label="replaying") as bar:
            summary = replay_entries(
                factory,
                entries,
                registry=registry,
                accept_test_numbers=settings.accept_test_nhs_numbers,
                progress=bar.update,
            )
    finally:
        engine.dispose()
    click.echo(summary.text())


if __name__ == "__main__":  # pragma: no cover
    main()
