"""
nanoGPT's "poor man's configurator", with its rough edges filed off. A script defines its config as module-level
globals (each with a trailing comment), then calls `config = configurator.configure(globals())`, which applies its
arguments left to right, later winning (python train.py config/vpred.py --k=5 --batch_size=2):
- `config/X.py` runs as Python in a namespace seeded with the current values. Config files are TRUSTED code (as in
  nanoGPT): never run one you did not read. A relative path is looked up in the working directory, then this repo.
- `--key=value` is parsed with ast.literal_eval (never exec), else kept as a string; a leading `~/` is expanded.
An unknown key fails naming the close matches; an int is accepted for a float; bools accept true/false/yes/no/1/0;
`--help` lists every key with its default and comment. A user's mistake, found anywhere in the repo, is a
UserError: configure() makes every entry script print it as one line on stderr and exit 2 (tracebacks are for bugs).
"""
import ast
import difflib
import io
import math
import os
import re
import sys
import tokenize
import types

REPO = os.path.dirname(os.path.abspath(__file__))
_BOOL = {"true": True, "false": False, "yes": True, "no": False, "1": True, "0": False, "on": True, "off": False}


class UserError(ValueError):
    """Something the user asked for cannot be done as asked; the message says what to do instead."""


class UserFileNotFound(UserError, FileNotFoundError):
    """A file or folder the user named does not exist."""


def check(cfg, choices=None, at_least=None, within=None):
    """One UserError naming every key whose value is not among its choices, below its minimum or outside its
    closed range (NaN and inf fail every numeric check), so a script can check its whole config up front."""
    bad = [f"--{k}={cfg[k]!r} is not one of {' | '.join(str(c) or repr(c) for c in ok)}"
           for k, ok in (choices or {}).items() if cfg[k] not in ok]
    ranges = {**{k: (lo, math.inf) for k, lo in (at_least or {}).items()}, **(within or {})}
    for k, (lo, hi) in ranges.items():
        v = cfg[k]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or not lo <= v <= hi:
            bound = "" if lo == -math.inf and hi == math.inf else f" >= {lo}" if hi == math.inf else f" in [{lo}, {hi}]"
            bad.append(f"--{k}={v!r} must be a finite number{bound}")
    if bad:
        raise UserError("config error: " + "; ".join(bad))


def check_device(device):
    """A UserError unless device is cpu, cuda or cuda:N for a CUDA device this machine has."""
    import torch  # (lazy: this module is plain Python otherwise)
    n = torch.cuda.device_count()
    if not re.fullmatch(r"cpu|cuda(:\d+)?", device) or (device != "cpu" and int(device[5:] or 0) >= n):
        raise UserError(f"config error: --device={device!r}: this machine has {n} CUDA devices; use cpu, cuda or "
                        f"cuda:N")


def on_stop_signals(handler=None):
    """Send SIGINT, SIGTERM and SIGHUP (a SIGHUP ignored under nohup stays ignored) to handler(signum, frame), so
    each ends a run the same way. The default handler prints one line and raises SystemExit(128 + signum), so
    finally blocks and context managers remove their temp files (the default action would kill the process)."""
    import signal

    def stop(signum, frame):
        print(f"stopped by {signal.Signals(signum).name}", file=sys.__stderr__, flush=True)
        raise SystemExit(128 + signum)

    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        if not (sig == signal.SIGHUP and signal.getsignal(sig) == signal.SIG_IGN):
            signal.signal(sig, handler or stop)


def _user_error_hook(kind, err, tb):
    if issubclass(kind, UserError):
        sys.stdout.flush()
        # the real stderr: torch.distributed wraps this hook and points sys.stderr at a buffer while it runs
        print(err, file=sys.__stderr__, flush=True)
        os._exit(2)  # after a hook the interpreter would exit 1; the finally blocks on the way up have run
    sys.__excepthook__(kind, err, tb)


def _comments(path):
    """{key: (comment, section)} from a script's `name = value  # comment` lines; the section is the last
    `# heading` line above the key (--help prints the keys under their headings)."""
    out, section = {}, ""
    try:
        for line in open(path, encoding="utf-8"):
            heading = re.match(r"^# ([a-zA-Z].*)$", line)
            if heading:
                section = heading.group(1).strip()
            m = re.match(r"^(\w+)\s*=.*?#\s*(.*)$", line)
            if m and m.group(1) not in out:
                out[m.group(1)] = (m.group(2).strip(), section)
    except (OSError, UnicodeDecodeError):
        pass
    return out


def script_defaults(path):
    """Another script's config keys and defaults (train.py's, for bench.py), read from its source without running
    it: each `key = expression` before its configure() call is evaluated with only torch in scope."""
    import torch
    out = {}
    for node in ast.parse(open(path, encoding="utf-8").read()).body:
        if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name):
            if ast.unparse(node.value).startswith("configurator.configure"):
                break
            if not node.targets[0].id.startswith("_"):  # (a leading _: not a config key)
                out[node.targets[0].id] = eval(compile(ast.Expression(node.value), path, "eval"), {"torch": torch})
    return out


def _coerce(key, value, default):
    """The value to store (type-checked against the default's type, '~' expanded), or a ValueError."""
    if default is None or value is None:
        return value
    value = _home(value, default)
    if isinstance(default, bool):
        if isinstance(value, bool):
            return value
        if isinstance(value, (int, str)) and str(value).lower() in _BOOL:
            return _BOOL[str(value).lower()]
    elif isinstance(default, int):
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif isinstance(default, float):
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)  # --lr=1 is a float too
        if str(value).lower() in ("nan", "inf", "-inf", "+inf"):
            return float(value)  # a float all the same; the script's range checks say why it cannot be used
    elif isinstance(default, (tuple, list)):
        if isinstance(value, (tuple, list)):
            return type(default)(value)
    elif isinstance(value, type(default)):
        return value
    raise ValueError(f"config key {key!r} expects {type(default).__name__} (default {default!r}), "
                     f"got {type(value).__name__} {value!r}")


def _unknown(key, keys):
    close = difflib.get_close_matches(key, keys, n=3, cutoff=0.6)
    hint = f"; did you mean {', '.join('--' + c for c in close)}?" if close else "; see --help"
    return ValueError(f"unknown config key {key!r}{hint}")


def _home(value, default=""):
    """'~' or a leading '~/' in a string key's value expanded, as the shell does only at the start of a word
    (--out_dir=~/runs arrives as it is); no key takes such a string as anything but a path. '~user' stays."""
    if isinstance(default, str) and isinstance(value, str) and (value == "~" or value.startswith("~/")):
        return os.path.expanduser(value)
    return value


def _python_text(path):
    """A config file's text, decoded as Python decodes a .py file it runs (UTF-8, a BOM allowed, or the encoding a
    coding line names; every line, comments included); a ValueError naming the line that is not."""
    try:
        with open(path, "rb") as f:
            source = f.read()
    except OSError as e:
        raise ValueError(f"cannot read config file {path}: {e.strerror}") from None
    hint = "save it as UTF-8 (or name its encoding in a '# -*- coding: NAME -*-' first line)"
    if b"\0" in source:
        raise ValueError(f"{path} holds NUL bytes: it is not UTF-8 text (UTF-16?); {hint}")
    try:
        encoding = tokenize.detect_encoding(io.BytesIO(source).readline)[0]
    except SyntaxError as e:  # the first two lines are not UTF-8, or a coding line names no known encoding
        why = "not UTF-8 text" if "invalid or missing" in e.msg else e.msg
        raise ValueError(f"{path} line 1: {why}; {hint}") from None
    try:
        return source.decode(encoding)
    except UnicodeDecodeError as e:
        line = source[:e.start].count(b"\n") + 1
        name = "UTF-8" if encoding.startswith("utf-8") else encoding
        raise ValueError(f"{path} line {line}: not {name} text; {hint}") from None


def _find_file(arg):
    arg = _home(arg)
    for p in (arg, os.path.join(REPO, arg)):
        if os.path.isfile(p):
            return p
    raise UserFileNotFound(f"config file {arg!r} not found (looked in {os.getcwd()} and {REPO})")


def _help(g, keys):
    script = os.path.basename(g.get("__file__", "script.py"))
    notes = {k: note for path in [*g.get("_config_sources", ()), g.get("__file__", "")]  # later files win
             for k, note in _comments(path).items()}
    print(f"usage: python {script} [config/FILE.py ...] [--key=value ...]   (later arguments win)")
    width = max(len(k) + len(repr(g[k])) for k in keys) + 4
    section = None
    for k in sorted(keys, key=lambda k: "debug" in notes.get(k, ("", ""))[1]):  # debugging keys last, apart
        comment, heading = notes.get(k, ("", ""))
        if heading != section:
            print(f"# {heading}" if heading else "")
            section = heading
        print(f"  --{k}={g[k]!r}".ljust(width + 2) + (f"  # {comment}" if comment else ""))


def configure(g, argv=None, exit_on_error=None):
    """Apply config files and --key=value overrides to the globals dict g; returns the final config dict.
    A bad argument ends a command-line run with one line (exit_on_error defaults to True when argv is
    sys.argv's); called with an explicit argv it raises ValueError / FileNotFoundError instead."""
    if exit_on_error is None:
        exit_on_error = argv is None
    if exit_on_error:
        sys.excepthook = _user_error_hook
    try:
        return _configure(g, sys.argv[1:] if argv is None else argv)
    except (ValueError, FileNotFoundError) as e:
        if not exit_on_error:
            raise
        raise UserError(f"config error: {e}") from None


def _configure(g, argv):
    plain = (int, float, bool, str, tuple, list, dict, type(None))
    keys = [k for k, v in g.items() if not k.startswith("_") and isinstance(v, plain)]  # the config globals
    g["_given"] = given = set()  # the keys a config file or --key=value set (a resume keeps the saved others)
    if any(a in ("-h", "--help") for a in argv):
        _help(g, keys)
        sys.exit(0)
    for arg in argv:
        if not arg.startswith("--"):
            if not arg.endswith(".py"):
                raise ValueError(f"unexpected argument {arg!r}: expected config/FILE.py or --key=value")
            path = _find_file(arg)
            print(f"config: {path}")
            ns = {k: g[k] for k in keys}
            text = _python_text(path)
            try:
                exec(compile(text, path, "exec"), ns)
            except Exception as e:  # the user's Python: say where, not a traceback into this file
                tb = e.__traceback__.tb_next  # the user's frame (a SyntaxError carries its line instead)
                line = getattr(e, "lineno", None) or (tb.tb_lineno if tb else "?")
                raise ValueError(f"{path} line {line}: {type(e).__name__}: {e}") from None
            assigned = {n.id for n in ast.walk(ast.parse(text))
                        if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store)}
            for k, v in ns.items():
                if k.startswith("_") or isinstance(v, (types.ModuleType, types.FunctionType, type)):
                    continue
                if k not in keys:
                    raise _unknown(k, keys)
                g[k] = _coerce(k, v, g[k])
                if k in assigned:
                    given.add(k)
        else:
            key, eq, val = arg[2:].partition("=")
            if not eq:
                raise ValueError(f"expected --key=value, got {arg!r}")
            if key not in keys:
                raise _unknown(key, keys)
            try:
                value = ast.literal_eval(val)
            except (SyntaxError, ValueError):
                value = val  # a bare string, e.g. --init_from=resume
            if isinstance(g[key], str) and not isinstance(value, str):
                value = val  # --out_dir=2024 is the string '2024'
            g[key] = _coerce(key, value, g[key])
            given.add(key)
            print(f"config: {key} = {g[key]!r}")
    return {k: g[k] for k in keys}
