"""Where `spa prune | apply-plan` write, checked before any work: every written path is a file in an
existing, writable folder, and none of them is (through links, `..` or a symlinked folder) the input
model, its external data, the plan being replayed or another input file, nor another written path.
A bad path is one SpaError; nothing is written and the user's files are never touched."""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile

from .errors import SpaError


def _real(path: str) -> str:
    try:
        return os.path.realpath(path)
    except (OSError, ValueError):
        raise SpaError(f"{path!r} is not a usable path") from None


def same(a: str, b: str) -> bool:
    """The same file: equal once links and '..' are resolved, or one inode (hard links)."""
    if _real(a) == _real(b):
        return True
    try:
        return os.path.samefile(a, b)
    except (OSError, ValueError):
        return False


def check_file_target(path: str, flag: str) -> None:
    """`path` can be written as a file: not a directory, in an existing, writable folder."""
    if not path or not path.strip():
        raise SpaError(f"{flag} is empty")
    if "\0" in path:
        raise SpaError(f"{flag} {path!r} is not a usable path")
    if path.endswith(("/", os.sep)) or os.path.isdir(path):
        raise SpaError(f"{flag} {path} is a directory; give a file name")
    if os.path.lexists(path) and os.path.exists(path) and not os.path.isfile(path):
        raise SpaError(f"{flag} {path} exists and is not a regular file")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise SpaError(f"{flag} {path}: the folder {folder} does not exist")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise SpaError(f"{flag} {path}: the folder {folder} is not writable")


def inputs_of(args) -> list:
    """(description, path) of every file the command reads that exists: the input model (every file
    of an input directory), the plan, --eval, and calibration, labels and tokenizer files."""
    found = []
    source = getattr(args, "source", None) or args.model
    if os.path.isdir(source):
        for folder, _, files in os.walk(source):
            found += [("a file of the input " + source, os.path.join(folder, f)) for f in files]
    elif os.path.exists(source):
        found.append(("the input model", source))
    for flag, attr in (("the plan", "plan"), ("the --eval file", "eval"), ("the --calibration file", "calibration"),
                       ("the --labels file", "labels"), ("the --tokenizer file", "tokenizer")):
        value = getattr(args, attr, None)
        if isinstance(value, str) and os.path.isfile(value):
            found.append((flag, value))
    return found


def check_outputs(args, output: str | None, directory_output: bool = False) -> None:
    """Before any work: -o (unless `directory_output`, a Hugging Face directory checked by its
    frontend) and --plan-out are files that can be written, and overwrite no input (-o the input
    model itself only with --overwrite) and not each other."""
    plan_out = getattr(args, "plan_out", None)
    if output and not directory_output:
        check_file_target(output, "-o")
    if plan_out is not None:
        check_file_target(plan_out, "--plan-out")
    inputs = inputs_of(args)
    if output and not directory_output:
        for what, path in inputs:
            if same(output, path) and not (what == "the input model" and args.overwrite):
                if what == "the input model":
                    raise SpaError("refusing to overwrite the input model (pass --overwrite)")
                raise SpaError(f"-o {output} is {what} ({path}); refusing to overwrite it")
    if plan_out is not None:
        for what, path in inputs:
            if same(plan_out, path):
                raise SpaError(f"--plan-out {plan_out} is {what} ({path}); refusing to overwrite it")
        if output and same(plan_out, output):
            raise SpaError(f"--plan-out {plan_out} is the -o file; give the plan its own name")
        if output and not directory_output and same(plan_out, data_file(output)):
            raise SpaError(f"--plan-out {plan_out} is where the external data of -o {output} may go "
                           f"({data_file(output)}); give the plan another name")


def data_file(output: str) -> str:
    """Where spa.pipeline.save puts the output's external data."""
    return output + ".data"


def check_data_files(args, output: str, writes_data: bool) -> None:
    """After the input is loaded, before any work: -o's files and --plan-out against the input's
    external data files, and the external data file -o writes against every input."""
    from .graph import external_data_files

    source = args.model  # the ONNX file loaded (a frontend's conversion lives in a temporary folder)
    if not os.path.isfile(source):
        return
    data = sorted(external_data_files(source))
    overwrite_self = bool(args.overwrite) and same(output, source)
    for path in data:
        if same(output, path):
            raise SpaError(f"-o {output} is the input's external data file ({path}); refusing to overwrite it")
        plan_out = getattr(args, "plan_out", None)
        if plan_out is not None and same(plan_out, path):
            raise SpaError(f"--plan-out {plan_out} is the input's external data file ({path}); "
                           "refusing to overwrite it")
    if not writes_data:
        return
    written = data_file(output)
    if os.path.isdir(written):
        raise SpaError(f"-o {output}: its external data would go to {written}, which is a directory")
    for path in data:
        if same(written, path) and not overwrite_self:
            raise SpaError(f"-o {output}: its external data file {written} is the input's external data "
                           f"({path}); writing it would break the input model (choose another -o name)")
    for what, path in inputs_of(args):
        if same(written, path) and not (overwrite_self and what == "the input model"):
            raise SpaError(f"-o {output}: its external data file {written} is {what} ({path}); "
                           "refusing to overwrite it")


def write_text(path: str, text: str, flag: str) -> None:
    """Write a file atomically (a temporary file beside it, then renamed): a failure is one
    SpaError and leaves no partial file."""
    import tempfile

    folder = os.path.dirname(os.path.abspath(path))
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=".spa-", dir=folder)
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
        tmp = None
    except OSError as exc:
        raise SpaError(f"{flag} {path}: could not be written ({exc.strerror or exc})") from None
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def staging_folder(path: str):
    """A temporary folder beside `path` (same filesystem, so os.replace into place is atomic),
    removed on exit whatever happens: writers stage there, verify, then rename."""
    target_dir = os.path.dirname(os.path.abspath(path)) or "."
    if not os.path.isdir(target_dir):
        raise SpaError(f"output directory {target_dir} does not exist")
    tmp = tempfile.mkdtemp(prefix=".spa-", dir=target_dir)
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
