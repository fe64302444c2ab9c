"""What ``ingest/connection.py`` relies on in uvicorn, checked against the installed library.

The behaviour (deadlines, the lingering close) is tested on a real gateway process in
``tests/integration/test_gateway.py``; this pins the versions and the names, so that an
upgrade of uvicorn fails here, by name, before it fails there by symptom.
"""

from __future__ import annotations

import asyncio
import inspect
import resource
from importlib.metadata import version

import uvicorn
from uvicorn.protocols.http import httptools_impl

from chargify_stream.base.settings import load_settings
from chargify_stream.ingest.connection import (
    Deadlines,
    GatewayProtocol,
    protocol_class,
    raise_open_files,
)
from chargify_stream.ingest.server import build_app, uvicorn_config
from tests.unit.test_gateway_app import FakeSink


def test_versions_are_the_ones_the_seam_was_written_for() -> None:
    assert version("uvicorn") == "0.54.0"
    assert version("httptools") == "0.9.0"


def test_the_uvicorn_names_the_seam_extends_exist() -> None:
    base = httptools_impl.HttpToolsProtocol
    for name in (
        "connection_made",
        "connection_lost",
        "on_message_begin",
        "on_headers_complete",
        "on_body",
        "on_message_complete",
        "on_response_complete",
        "data_received",
    ):
        assert callable(getattr(base, name)), name
        assert name in GatewayProtocol.__dict__, name
    params = list(inspect.signature(base.__init__).parameters)
    assert params[:4] == ["self", "config", "server_state", "app_state"]
    cycle = inspect.signature(httptools_impl.RequestResponseCycle.__init__).parameters
    assert "keep_alive" in cycle
    source = inspect.getsource(httptools_impl.RequestResponseCycle)
    # The cycle closes the connection after an answer only when keep_alive is False.
    assert "if not self.keep_alive:\n                    self.transport.close()" in source
    assert "self.response_complete = True" in source
    assert "self.body = bytearray()" in source
    protocol_source = inspect.getsource(base)
    assert "self.expect_100_continue = False" in inspect.getsource(base.on_message_begin)
    assert "self.flow = FlowControl(transport)" in protocol_source
    assert "self.flow.resume_reading()" in inspect.getsource(
        httptools_impl.RequestResponseCycle.receive
    )


def test_the_gateway_is_served_with_the_seam() -> None:
    settings = load_settings(gateway_header_timeout_s=3, gateway_keep_alive_s=2.5)
    config = uvicorn_config(settings, build_app(settings, sink=FakeSink()))
    assert config.limit_concurrency is None  # idle connections must not count
    assert config.timeout_keep_alive == 3
    config.load()
    protocol = config.http_protocol_class
    assert issubclass(protocol, GatewayProtocol)
    deadlines = protocol.deadlines
    assert (deadlines.header_timeout_s, deadlines.body_timeout_s) == (3, 5)
    assert deadlines.keep_alive_s == 2.5
    assert uvicorn.__version__ == "0.54.0"


def test_a_protocol_is_made_the_way_uvicorn_makes_it() -> None:
    """uvicorn's server calls the class with (config, server_state, app_state, _loop)."""
    settings = load_settings()
    config = uvicorn_config(settings, build_app(settings, sink=FakeSink()))
    config.load()
    loop = asyncio.new_event_loop()
    try:
        cls = protocol_class(Deadlines(1, 1, 1))
        made = cls(
            config=config, server_state=uvicorn.server.ServerState(), app_state={}, _loop=loop
        )
        assert made.deadlines == Deadlines(1, 1, 1)
    finally:
        loop.close()


def test_the_open_files_soft_limit_is_raised_to_the_hard_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(soft, 256), hard))
    try:
        expected = hard if hard != resource.RLIM_INFINITY else min(soft, 256)
        assert raise_open_files() == expected
        assert resource.getrlimit(resource.RLIMIT_NOFILE)[0] == expected
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
