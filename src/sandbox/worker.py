# ifloom's Python sandbox worker (src/sandbox/mod.rs starts it as `python3 -s -B -c <this>`).
#
# This process is trusted: it never executes the code it is given. It reads jobs (a function's
# source and the inputs to call it on) as JSON lines on stdin and, per job, forks a child that
# locks itself down, execs the source and calls `evaluate(input)` on each input, sending one
# JSON line per call back through a pipe. A child that hangs past the call's deadline, dies or
# sends garbage is killed; the call gets the reason and a fresh child takes the inputs left.
# One result line per job goes to stdout, so a job's results always come back whole.
#
# Why a child per job: nothing a function does (threads, signal handlers, monkey-patched
# modules, a forged result written to a pipe) can outlive its job or touch another function's
# results. Forking a warmed-up interpreter costs about a millisecond.
import json
import os
import random
import select
import shutil
import signal
import sys
import time

# The names upstream's cross-validation script had imported when it exec'd the functions (Qwen
# AutoIF code/3_cross_validation.py): LLM-written functions often use `re` or `json` without
# importing them, and they worked there. Imported here once, before any fork.
import collections  # noqa: F401  (warm: verifiers import these constantly)
import copy
import itertools  # noqa: F401
import logging
import math  # noqa: F401
import re
import string  # noqa: F401
import unicodedata  # noqa: F401
import resource
import sysconfig

# Upstream's script also had `nltk` and `numpy as np` imported (verifiers count sentences with
# `nltk.sent_tokenize` and average with `np.mean` without importing either). They are imported
# here, before any fork, when the interpreter has them (scripts/sandbox-venv.sh makes one that
# does); NLTK's English sentence tokenizer is loaded once so no child pays for it.
try:
    import numpy as np
except Exception:  # noqa: BLE001  (absent or broken: functions using np raise NameError)
    np = None
try:
    import nltk
except Exception:  # noqa: BLE001
    nltk = None
PUNKT = False
if nltk is not None:
    try:
        nltk.sent_tokenize("Warm up. Done.")
        PUNKT = True
    except Exception:  # noqa: BLE001  (no punkt_tab data: sent_tokenize raises LookupError)
        pass

PROTO_IN = os.fdopen(os.dup(0), "rb")
PROTO_OUT = os.fdopen(os.dup(1), "wb")
_devnull = os.open(os.devnull, os.O_RDWR)
for _fd in (0, 1, 2):
    os.dup2(_devnull, _fd)

MAX_FRAME = 256 * 1024
REPR_CHARS = 200
MESSAGE_CHARS = 300

READ_ROOTS = []
for _key in ("stdlib", "platstdlib", "purelib", "platlib"):
    _p = sysconfig.get_paths().get(_key)
    if _p:
        READ_ROOTS.append(os.path.realpath(_p))
for _p in sys.path:
    if _p and os.path.isabs(_p) and os.path.isdir(_p):
        READ_ROOTS.append(os.path.realpath(_p))
READ_FILES = {"/dev/null", "/dev/urandom", "/dev/random", "/etc/localtime"}
# NLTK's sentence tokenizer data, read-only, wherever NLTK looks for it: only the Punkt
# folders (and their zip files), not the rest of an nltk_data folder.
if nltk is not None:
    for _p in nltk.data.path:
        for _name in ("punkt_tab", "punkt"):
            _d = os.path.join(_p, "tokenizers", _name)
            if os.path.isdir(_d):
                READ_ROOTS.append(os.path.realpath(_d))
            if os.path.isfile(_d + ".zip"):
                READ_FILES.add(os.path.realpath(_d + ".zip"))


class SandboxViolation(Exception):
    """What the audit hook raises when a function tries something it may not do."""


def _under(path, root):
    return path == root or path.startswith(root.rstrip("/") + "/")


def install_guard(scratch):
    """Audit hook of the child: refuses network, processes, signals to others, native code,
    raising limits, and file access outside the scratch folder (reads also inside Python's own
    library folders and NLTK's Punkt data). Audit hooks cannot be removed once added."""
    scratch = os.path.realpath(scratch)
    blocked_imports = {"ctypes", "_ctypes", "_posixsubprocess", "cffi", "_cffi_backend"}
    for name in list(sys.modules):
        if name.split(".")[0] in blocked_imports or name in ("subprocess", "multiprocessing"):
            del sys.modules[name]
    denied = {
        "os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.fork", "os.forkpty",
        "os.kill", "os.killpg", "os.startfile", "subprocess.Popen", "pty.spawn",
        "resource.setrlimit", "resource.prlimit", "os.setuid", "os.chroot",
        "webbrowser.open", "urllib.Request", "http.client.connect", "ftplib.connect",
        "smtplib.connect", "imaplib.open", "poplib.connect", "telnetlib.Telnet.open",
        "_thread.start_new_thread", "sys.remote_exec", "mmap.__new__",
    }
    path_writes = {
        "os.remove", "os.rename", "os.rmdir", "os.mkdir", "os.chmod", "os.chown",
        "os.link", "os.symlink", "os.truncate", "os.utime", "os.chflags", "os.lchflags",
        "os.mkfifo", "os.mknod", "os.chdir", "shutil.rmtree", "shutil.move",
        "shutil.copyfile", "shutil.copymode", "shutil.copystat", "shutil.copytree",
        "shutil.make_archive", "shutil.unpack_archive", "shutil.chown",
    }
    path_reads = {"os.listdir", "os.scandir", "glob.glob", "os.walk"}
    write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND

    def real(p):
        if isinstance(p, int):
            return None
        try:
            p = os.fsdecode(os.fspath(p))
        except TypeError:
            return None
        return os.path.realpath(p)

    def readable(p):
        return p is not None and (
            _under(p, scratch) or p in READ_FILES or any(_under(p, r) for r in READ_ROOTS)
        )

    def writable(p):
        return p is not None and _under(p, scratch)

    def hook(event, args):
        if event in denied or event.startswith("socket.") or event.startswith("ctypes."):
            raise SandboxViolation("refused: " + event)
        if event == "import" and args and str(args[0]).split(".")[0] in blocked_imports:
            raise SandboxViolation("refused: import " + str(args[0]))
        if event == "open":
            path, mode, flags = (list(args) + [None, None, None])[:3]
            if isinstance(path, int):
                # Inherited descriptors (0-2 are /dev/null; the result pipe is ours).
                raise SandboxViolation("refused: open of a file descriptor")
            p = real(path)
            writing = (isinstance(mode, str) and any(c in mode for c in "wax+")) or (
                isinstance(flags, int) and flags & write_flags
            )
            if writing and not writable(p):
                raise SandboxViolation("refused: write outside the scratch folder: %s" % path)
            if not writing and not readable(p):
                raise SandboxViolation("refused: read outside the sandbox: %s" % path)
        elif event in path_writes:
            for a in args[:2]:
                if isinstance(a, (str, bytes, os.PathLike)) and not writable(real(a)):
                    raise SandboxViolation("refused: %s outside the scratch folder" % event)
        elif event in path_reads:
            if args and isinstance(args[0], (str, bytes, os.PathLike)) and not readable(real(args[0])):
                raise SandboxViolation("refused: %s outside the sandbox" % event)

    sys.addaudithook(hook)


class CallTimeout(Exception):
    pass


def _alarm(signum, frame):
    # As upstream (signal.alarm + a handler raising TimeoutError): raised inside the function.
    raise TimeoutError("Function execution timed out")


def describe(value):
    """The call's value as the engine needs it: JSON for plain values, a repr otherwise, and the
    Python comparisons that decide AutoIF's rules (`== True`, `== False`, `int(value)`)."""
    out = {"type": type(value).__name__}
    if value is None or isinstance(value, (bool, str)) or (
        isinstance(value, (int, float)) and type(value) in (int, float)
        and (not isinstance(value, int) or abs(value) < 2**53)
        and (not isinstance(value, float) or value == value and abs(value) != float("inf"))
    ):
        v = value
        if isinstance(v, str) and len(v) > REPR_CHARS:
            v = v[:REPR_CHARS]
            out["truncated"] = True
        out["value"] = v
    else:
        try:
            r = repr(value)
        except BaseException as e:  # noqa: BLE001
            r = "<repr failed: %s>" % type(e).__name__
        out["repr"] = r[:REPR_CHARS]
    for key, other in (("eq_true", True), ("eq_false", False)):
        try:
            out[key] = bool(value is not None and value == other)
        except BaseException:  # noqa: BLE001
            out[key] = False
    try:
        i = int(value)
        out["as_int"] = i if abs(i) < 2**63 else None
    except BaseException:  # noqa: BLE001
        out["as_int"] = None
    return out


# The result line of a call that returned True, False or None: what describe() gives for them.
PLAIN_LINES = {
    v: (b'{"i": %d, "outcome": "ok", '
        + json.dumps(describe(v)).encode()[1:-1].replace(b"%", b"%%")
        + b', "ms": %.4f}\n')
    for v in (True, False, None)
}


def child(job, first, wfd, scratch):
    """Runs in the forked child: lock down, exec, call inputs[first:], one line per call."""
    os.chdir(scratch)
    os.setsid()
    limits = job.get("limits", {})
    mem = int(limits.get("memory_mb", 1024)) * 1024 * 1024
    n_calls = len(job["inputs"]) - first
    cpu = int(limits.get("cpu_s", 0)) or int(job["timeout_s"] * max(n_calls, 1) + 10)
    for res, soft in (
        (resource.RLIMIT_AS, mem),
        (resource.RLIMIT_CPU, cpu),
        (resource.RLIMIT_FSIZE, int(limits.get("file_mb", 16)) * 1024 * 1024),
        (resource.RLIMIT_CORE, 0),
        (resource.RLIMIT_NPROC, 0),
        (resource.RLIMIT_NOFILE, 64),
    ):
        try:
            hard = soft + 1 if res == resource.RLIMIT_CPU else soft
            resource.setrlimit(res, (soft, hard))
        except (ValueError, OSError):
            pass
    random.seed(0)
    install_guard(scratch)

    def send(obj):
        data = (json.dumps(obj, ensure_ascii=True) + "\n").encode()
        os.write(wfd, data)

    namespace = {
        "__name__": "__main__", "__builtins__": __builtins__,
        "json": json, "re": re, "random": random, "os": os, "copy": copy, "time": time,
        "logging": logging,
    }
    if nltk is not None:
        namespace["nltk"] = nltk
    if np is not None:
        namespace["np"] = np
    t0 = time.perf_counter()
    try:
        code = compile(job["source"], "<verifier>", "exec")
        exec(code, namespace)
        fn = namespace.get("evaluate")
        compiled = {"ok": True, "has_evaluate": callable(fn)}
        if not callable(fn):
            fn = None
            compiled["error"] = "NoEvaluate"
            compiled["message"] = "the source defines no function named evaluate"
    except BaseException as e:  # noqa: BLE001
        fn = None
        compiled = {"ok": False, "has_evaluate": False, "error": type(e).__name__,
                    "message": str(e)[:MESSAGE_CHARS]}
    compiled["ms"] = (time.perf_counter() - t0) * 1000
    send({"compile": compiled})
    if fn is None:
        os._exit(0)
    signal.signal(signal.SIGALRM, _alarm)
    timeout = float(job["timeout_s"])
    for i in range(first, len(job["inputs"])):
        arg = job["inputs"][i]
        t0 = time.perf_counter()
        try:
            signal.setitimer(signal.ITIMER_REAL, timeout)
            value = fn(arg)
            if value is True or value is False or value is None:
                # Most verifiers return a bool: its line is preformatted (describe() and
                # json.dumps cost more than the call itself).
                signal.setitimer(signal.ITIMER_REAL, 0)
                os.write(wfd, PLAIN_LINES[value] % (i, (time.perf_counter() - t0) * 1000))
                continue
            described = describe(value)
            signal.setitimer(signal.ITIMER_REAL, 0)
            out = {"i": i, "outcome": "ok"}
            out.update(described)
        except BaseException as e:  # noqa: BLE001  (SystemExit too: only this call fails)
            signal.setitimer(signal.ITIMER_REAL, 0)
            kind = "timeout" if isinstance(e, TimeoutError) and str(e) == "Function execution timed out" else "error"
            if isinstance(e, SandboxViolation):
                kind = "refused"
            try:
                msg = str(e)[:MESSAGE_CHARS]
            except BaseException:  # noqa: BLE001
                msg = "<str failed>"
            out = {"i": i, "outcome": kind, "error": type(e).__name__, "message": msg}
        out["ms"] = (time.perf_counter() - t0) * 1000
        send(out)
    os._exit(0)


def run_job(job, scratch_root, counter):
    inputs = job["inputs"]
    timeout = float(job["timeout_s"])
    grace = float(job.get("grace_s", 2.0))
    compile_timeout = float(job.get("compile_timeout_s", timeout))
    calls = [None] * len(inputs)
    compiled = None
    first = 0
    while True:
        counter[0] += 1
        scratch = os.path.join(scratch_root, "job-%d" % counter[0])
        os.mkdir(scratch, 0o700)
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            try:
                os.close(r)
                PROTO_IN.close()
                PROTO_OUT.close()
                child(job, first, w, scratch)
            finally:
                os._exit(70)
        os.close(w)
        buf = b""
        current = None  # None while the child compiles
        deadline = time.monotonic() + compile_timeout + grace
        reason = None
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                reason = "timeout"
                break
            ready, _, _ = select.select([r], [], [], left)
            if not ready:
                continue
            chunk = os.read(r, 65536)
            if not chunk:
                reason = "crashed"
                break
            buf += chunk
            bad = False
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                try:
                    msg = json.loads(line)
                except ValueError:
                    bad = True
                    break
                if not isinstance(msg, dict):
                    bad = True
                    break
                if "compile" in msg and current is None:
                    # A fresh child after a crash compiles again; the first answer stands.
                    if compiled is None:
                        compiled = msg["compile"]
                    if not (compiled.get("has_evaluate") and msg["compile"].get("has_evaluate")):
                        break
                    current = first
                elif isinstance(msg.get("i"), int) and current is not None and msg["i"] == current:
                    calls[current] = msg
                    current += 1
                else:
                    bad = True
                    break
                deadline = time.monotonic() + timeout + grace
            if bad or len(buf) > MAX_FRAME:
                reason = "garbled"
                break
            if compiled is not None and (not compiled.get("has_evaluate") or current >= len(inputs)):
                break
        if reason is not None:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        _, status = os.waitpid(pid, 0)
        os.close(r)
        shutil.rmtree(scratch, ignore_errors=True)
        if reason is None:
            break
        if os.WIFSIGNALED(status) and reason == "crashed":
            why = "the process died (signal %d)" % os.WTERMSIG(status)
        elif reason == "crashed":
            why = "the process exited (status %d)" % os.WEXITSTATUS(status)
        elif reason == "timeout":
            limit = (compile_timeout if compiled is None else timeout) + grace
            why = "no answer within %.1f s; killed" % limit
        else:
            why = "sent something that is not a result; killed"
        if compiled is None:
            compiled = {"ok": False, "has_evaluate": False,
                        "error": "Timeout" if reason == "timeout" else "Crashed", "message": why}
            break
        # The call under way (or, if the fresh child died compiling again, the next one) fails.
        if current is None:
            current = first
        if current >= len(inputs):
            break
        calls[current] = {"i": current, "outcome": "timeout" if reason == "timeout" else "crashed",
                          "error": "Timeout" if reason == "timeout" else "Crashed", "message": why}
        first = current + 1
        if first >= len(inputs):
            break
    return {"id": job.get("id"), "compile": compiled, "calls": calls}


def main():
    scratch_root = sys.argv[1]
    os.makedirs(scratch_root, exist_ok=True)
    counter = [0]
    # The interfaces this process sees (its network namespace's): only "lo" means none.
    try:
        import socket
        net = sorted(name for _, name in socket.if_nameindex())
    except OSError:
        net = None
    # Everything imported so far goes to the collector's permanent generation: a child's
    # collections then never walk (and copy-on-write) the parent's pages of nltk and numpy.
    import gc
    gc.collect()
    gc.freeze()
    ready = {"ready": True, "python": sys.version.split()[0], "net": net,
             "nltk": getattr(nltk, "__version__", None), "numpy": getattr(np, "__version__", None),
             "punkt": PUNKT}
    PROTO_OUT.write((json.dumps(ready) + "\n").encode())
    PROTO_OUT.flush()
    while True:
        line = PROTO_IN.readline()
        if not line:
            break
        job = json.loads(line)
        result = run_job(job, scratch_root, counter)
        PROTO_OUT.write((json.dumps(result, ensure_ascii=True) + "\n").encode())
        PROTO_OUT.flush()
    shutil.rmtree(scratch_root, ignore_errors=True)


main()
