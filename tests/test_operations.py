"""One table of operations behind every transport and route; one error tree behind every error."""

import asyncio
import importlib
import inspect
import pkgutil
import typing

import pytest

from tandem.protocols import errors
from tandem.protocols.messages import ErrorCode, ErrorReply, GetInfo
from tandem.protocols.operations import OPERATIONS, REQUEST_ADAPTER, dispatch, operation_for
from tandem.remote_gateway.app import create_app
from tandem.remote_gateway.service import Gateway
from tandem.sdk import SyncClient

from .conftest import run


def test_every_operation_has_a_handler_a_route_and_a_wire_form(tiny_gateway):
    routes = {(r.path, m) for r in create_app(tiny_gateway).routes for m in getattr(r, "methods", ())}
    wire_types = set(REQUEST_ADAPTER.json_schema()["discriminator"]["mapping"])
    for op in OPERATIONS:
        assert inspect.iscoroutinefunction(getattr(Gateway, op.name)), op.name
        assert (op.path, op.method) in routes, op.path
        assert op.request.model_fields["type"].default in wire_types  # the MQTT bridge parses it


def test_dispatch_goes_through_the_table(tiny_gateway):
    info = run(dispatch(tiny_gateway, GetInfo()))
    assert info.model == tiny_gateway.model_name
    with pytest.raises(errors.GatewayError, match="not a gateway request"):
        operation_for(ErrorReply(code="internal", message="x"))


def test_every_error_code_has_its_class_and_status():
    for code in typing.get_args(ErrorCode):
        exc = errors.gateway_error(code, "m")
        assert isinstance(exc, errors.GatewayError) and exc.code == code and 400 <= exc.status < 600
        assert errors.from_reply(exc.to_reply()).__class__ is exc.__class__
    assert isinstance(errors.gateway_error("tokenizer_mismatch", "m"), errors.TokenizerMismatchError)
    assert errors.TokenizerMismatchError("m").status == 409


def _project_exceptions():
    import tandem

    found = set()
    for pkg in ("protocols", "local_runtime", "remote_gateway", "routing", "sdk"):
        package = importlib.import_module(f"tandem.{pkg}")
        for info in pkgutil.walk_packages(package.__path__, prefix=f"tandem.{pkg}."):
            if info.name.endswith(".__main__"):
                continue
            try:
                module = importlib.import_module(info.name)
            except ImportError:  # an optional extra this environment lacks
                continue
            for _, cls in inspect.getmembers(module, inspect.isclass):
                if issubclass(cls, BaseException) and cls.__module__.startswith("tandem."):
                    found.add(cls)
    assert tandem  # the namespace package
    return found


def test_every_project_exception_is_a_tandem_error_drawn_in_the_tree():
    tree = errors.__doc__
    for cls in _project_exceptions():
        if cls.__name__.startswith("_"):
            continue
        assert issubclass(cls, errors.TandemError), f"{cls.__module__}.{cls.__name__} is not a TandemError"
        assert cls.__module__ == "tandem.protocols.errors", f"{cls.__name__} is defined outside the errors module"
        assert cls.__name__ in tree, f"{cls.__name__} is not drawn in the error tree"
    # the ones that replace a builtin still are one
    assert issubclass(errors.PolicyFileError, ValueError) and issubclass(errors.EmbeddingUnavailable, ImportError)


def test_sync_client_inside_a_running_loop_names_the_async_client():
    async def inside():
        with pytest.raises(errors.TandemError, match="async tandem.sdk.Client"):
            SyncClient(drafter="tiny-llama", gateway="inproc")

    asyncio.run(inside())
