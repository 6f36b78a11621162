"""Triton's CPU interpreter without its repeated patching of `triton.language` in device-function calls.

Each call of a @triton.jit helper from a kernel re-patches every builtin of `triton.language` (a scan of the
modules with `inspect.getmembers`), though the kernel's launch patched them already and nothing undoes that until
the launch ends: about half of an interpreted model's time. `skip_repeated_patching` patches once per launch and
set of language modules, which leaves every module patched exactly as before; the kernels run the same
interpreted code. It changes nothing unless the interpreter's device-function call is the one it was written
against (Triton 3.9); with another Triton the tests run as they are, only slower.
"""
from __future__ import annotations

import inspect

EXPECTED_DEVICE_CALL = '''    def __call__(self, *args, **kwargs):
        # This is a device function call
        _patch_lang(self.fn)
        fn = self.rewrite()
        try:
            return fn(*args, **kwargs)
        except Exception as e:
            raise InterpreterError(repr(e)) from e
'''


def skip_repeated_patching() -> bool:
    """Installs the change in this process; whether it did."""
    import triton.language as tl
    from triton.runtime import interpreter

    device_call = interpreter.InterpretedFunction.__call__
    if getattr(device_call, "patches_once", False):
        return True
    if inspect.getsource(device_call) != EXPECTED_DEVICE_CALL:
        return False
    launch = interpreter.GridExecutor.__call__
    patched: list[set | None] = [None]  # during a launch: the sets of language modules patched in it
    languages: dict = {}  # function -> the language modules it sees

    def launch_once(self, *args, **kwargs):
        patched[0] = set()
        try:
            return launch(self, *args, **kwargs)
        finally:
            patched[0] = None

    def call_device_function(self, *args, **kwargs):
        key = languages.get(self.fn)
        if key is None:
            key = languages[self.fn] = frozenset(id(v) for v in self.fn.__globals__.values()
                                                 if inspect.ismodule(v) and v in (tl, tl.core))
        if patched[0] is None or key not in patched[0]:
            interpreter._patch_lang(self.fn)
            if patched[0] is not None:
                patched[0].add(key)
        fn = self.rewrite()
        try:
            return fn(*args, **kwargs)
        except Exception as e:
            raise interpreter.InterpreterError(repr(e)) from e

    call_device_function.patches_once = True
    interpreter.GridExecutor.__call__ = launch_once
    interpreter.InterpretedFunction.__call__ = call_device_function
    return True
