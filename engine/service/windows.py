"""The one pywin32 importer: a thin :class:`engine.service.scm.ScmApi` over ``win32service``.

Owns: the pywin32 calls and nothing else: each method is one or two calls, with pywin32's errors turned into
:class:`ScmError` (code, function, text). All decisions live in ``scm``, which is tested through a fake SCM;
this file is only exercised on Windows.

Must not: use ``win32serviceutil`` (its ``ChangeServiceConfig`` rewrites the binary path of a service that
is not written in Python); change any setting but the start type (``SERVICE_NO_CHANGE`` and ``None`` for
everything else); hold a handle past the call that opened it.

pywin32 is imported when a :class:`WindowsScm` is made, so this module imports on any system.
"""

from __future__ import annotations

from typing import Any, cast

from engine.service import ServiceError
from engine.service.scm import ScmConfig, ScmError, ScmStatus


class WindowsScm:  # pragma: no cover - Windows only
    """The local Service Control Manager through pywin32. A handle is the pair (manager, service)."""

    def __init__(self) -> None:
        try:
            import pywintypes  # type: ignore[import-not-found,import-untyped,unused-ignore]
            import win32service  # type: ignore[import-not-found,import-untyped,unused-ignore]
        except ImportError:
            raise ServiceError(
                "service backend 'windows' needs pywin32 (pip install 'standby[windows]'), on Windows"
            ) from None
        self._ws: Any = win32service
        self._error: type[BaseException] = pywintypes.error

    def _call(self, func: Any, *args: Any) -> Any:
        try:
            return func(*args)
        except self._error as e:
            code = getattr(e, "winerror", 0) or 0
            func_name = str(getattr(e, "funcname", "") or "")
            raise ScmError(int(code), func_name, str(getattr(e, "strerror", e))) from None

    def open_service(self, name: str, access: int) -> object:
        ws = self._ws
        manager = self._call(ws.OpenSCManager, None, None, ws.SC_MANAGER_CONNECT)
        try:
            service = self._call(ws.OpenService, manager, name, access)
        except ScmError:
            self._call(ws.CloseServiceHandle, manager)
            raise
        return (manager, service)

    def close_service(self, handle: object) -> None:
        manager, service = cast(tuple[Any, Any], handle)
        try:
            self._call(self._ws.CloseServiceHandle, service)
        finally:
            self._call(self._ws.CloseServiceHandle, manager)

    def query_status(self, handle: object) -> ScmStatus:
        s = self._call(self._ws.QueryServiceStatusEx, _service(handle))
        return ScmStatus(
            state=int(s["CurrentState"]),
            win32_exit_code=int(s["Win32ExitCode"]),
            service_exit_code=int(s["ServiceSpecificExitCode"]),
            checkpoint=int(s["CheckPoint"]),
            wait_hint_ms=int(s["WaitHint"]),
            pid=int(s["ProcessId"]),
        )

    def start_service(self, handle: object) -> None:
        self._call(self._ws.StartService, _service(handle), None)

    def control_stop(self, handle: object) -> None:
        self._call(self._ws.ControlService, _service(handle), self._ws.SERVICE_CONTROL_STOP)

    def query_config(self, handle: object) -> ScmConfig:
        ws = self._ws
        start_type = int(self._call(ws.QueryServiceConfig, _service(handle))[1])
        delayed = False
        if start_type == ws.SERVICE_AUTO_START:
            try:
                info = ws.SERVICE_CONFIG_DELAYED_AUTO_START_INFO
                delayed = bool(self._call(ws.QueryServiceConfig2, _service(handle), info))
            except ScmError:
                delayed = False  # the flag is a detail of "auto"; not being able to read it changes nothing
        return ScmConfig(start_type, delayed)

    def change_start_type(self, handle: object, start_type: int) -> None:
        # INVARIANT: win32service.ChangeServiceConfig with SERVICE_NO_CHANGE / None for every other
        # setting, never win32serviceutil.ChangeServiceConfig (it sets the binary path to pythonservice).
        ws = self._ws
        keep = ws.SERVICE_NO_CHANGE
        self._call(
            ws.ChangeServiceConfig,
            _service(handle),
            keep,  # service type
            start_type,
            keep,  # error control
            None,  # binary path
            None,  # load order group
            False,  # fetch tag
            None,  # dependencies
            None,  # account
            None,  # password
            None,  # display name
        )


def _service(handle: object) -> object:  # pragma: no cover - Windows only
    return cast(tuple[Any, Any], handle)[1]
