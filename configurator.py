"""
Config files and command-line overrides, for train.py, sample.py and friends:
    python train.py config/mac_micro.py --batch_size=4 --compile=False
A config file is plain Python assignments. Every key, from a file or the command line, must already be a
global of the calling script; anything else is one error line naming the closest known key.
Unlike nanoGPT's exec-into-globals, a typo cannot silently create a new setting.
"""
import ast
import difflib
import sys


class ConfigError(Exception):
    pass


def _known(key, defaults, where):
    if key not in defaults:
        close = difflib.get_close_matches(key, list(defaults), n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise ConfigError(f"unknown config key '{key}' in {where}{hint}")


def _coerce(key, value, default, where):
    """Accept value for key if it fits the default's type: int for float, anything for None."""
    if default is None or value is None:
        return value
    if isinstance(default, bool):
        if isinstance(value, bool):
            return value
    elif isinstance(default, float):
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif isinstance(value, type(default)) and not isinstance(value, bool):
        return value
    raise ConfigError(f"config key '{key}' in {where} wants a {type(default).__name__}, got {value!r}")


def _parse_value(text):
    low = text.lower()
    if low in ("true", "false"):
        return low == "true"
    if low == "none":
        return None
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text  # a bare string such as --device=cuda


def _read_file(path):
    try:
        with open(path) as f:
            source = f.read()
    except OSError as e:
        raise ConfigError(f"cannot read config file {path}: {e.strerror}")
    scope = {}
    try:
        exec(compile(source, path, "exec"), scope)
    except Exception as e:
        line = getattr(e, "lineno", None) or _lineno(e, path)
        raise ConfigError(f"{path}:{line}: {type(e).__name__}: {e}")
    # plain values only: modules or helper functions imported by the file are not settings
    return {k: v for k, v in scope.items() if not k.startswith("_") and isinstance(v, (int, float, bool, str, tuple, type(None)))}


def _lineno(exc, path):
    tb = exc.__traceback__
    line = "?"
    while tb is not None:
        if tb.tb_frame.f_code.co_filename == path:
            line = tb.tb_lineno
        tb = tb.tb_next
    return line


def parse(argv, defaults):
    """Returns {key: value} for every setting argv changes. Raises ConfigError with a one-line message."""
    out = {}
    i = 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--"):
            for key, value in _read_file(arg).items():
                _known(key, defaults, arg)
                out[key] = _coerce(key, value, defaults[key], arg)
        else:
            key, eq, text = arg[2:].partition("=")
            if not eq:  # --key value
                if i + 1 >= len(argv):
                    raise ConfigError(f"--{key} needs a value: --{key}=VALUE")
                i += 1
                text = argv[i]
            key = key.replace("-", "_")
            _known(key, defaults, "the command line")
            out[key] = _coerce(key, _parse_value(text), defaults[key], f"--{key}")
        i += 1
    return out


def script_defaults(path):
    """A script's settings (its top-level assignments of plain values), read from its source without running it:
    what another script checks a config against (safe_train.py, model.py against train.py's)."""
    with open(path) as f:
        tree = ast.parse(f.read())
    out = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            try:
                out[node.targets[0].id] = ast.literal_eval(node.value)
            except ValueError:
                pass
    return out


def configure(scope, argv=None, keys=None):
    """Apply sys.argv[1:] to the dict `scope` (a script's globals()); exit with one line on bad input.
    keys: the names that count as settings (default: every plain-valued global not starting with _)."""
    argv = sys.argv[1:] if argv is None else argv
    keys = keys or [k for k, v in scope.items() if not k.startswith("_") and isinstance(v, (int, float, bool, str, tuple, type(None)))]
    try:
        changes = parse(argv, {k: scope[k] for k in keys})
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        sys.exit(2)  # bad input: running again will not help (train.py's exit codes)
    scope.update(changes)
    return {k: scope[k] for k in keys}
