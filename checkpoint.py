"""
What a checkpoint is, in a few functions that train.py, sample.py, safe_train.py and the tests call:
    out_dir/ckpt_<iter>/   a torch.distributed.checkpoint directory (.metadata + one .distcp per rank) + config.json
    out_dir/latest         the name of the newest complete checkpoint
    out_dir/.lock          held by the one process that writes to out_dir (an OS lock: a killed holder leaves none)
The promises: `latest` only ever names a checkpoint verified complete; pruning never removes the one `latest`
names nor anything saved after it (save order, not iteration number); a missing or damaged checkpoint is a
loud fallback to an older complete one, never a silent start from zero; a save that fails (a full disk) leaves
no partial checkpoint behind and `latest` where it was.
This file needs torch only to write and read the DCP files themselves.
"""
import errno
import json
import os
import shutil
import tempfile
import time

from configurator import BadInput


class CheckpointError(BadInput):
    """A checkpoint problem; the message is one line that names the file and the fix."""


class Damaged(CheckpointError):
    """A checkpoint complete by its sizes whose contents do not read (zeros where a power loss left them)."""


class DiskFull(CheckpointError):
    """A save that found no space left: running again will not help until space is freed."""


def names(out_dir):
    """ckpt_<iter> folders in out_dir, complete or not."""
    if not os.path.isdir(out_dir):
        return []
    return [n for n in os.listdir(out_dir) if n.startswith("ckpt_") and n[5:].isdigit()]


def verify(path):
    """None when path is a complete checkpoint, else one line saying what is wrong with which file: its
    config.json and .metadata read, and every shard file the metadata points into is there, whole."""
    if not os.path.isdir(path):
        return f"{path} does not exist"
    try:
        with open(os.path.join(path, "config.json")) as f:
            json.load(f)
    except (OSError, ValueError) as e:
        return f"{os.path.join(path, 'config.json')} is missing or damaged ({type(e).__name__})"
    meta = os.path.join(path, ".metadata")
    if not os.path.exists(meta):
        return f"{meta} is missing"
    try:
        from torch.distributed.checkpoint import FileSystemReader

        storage = FileSystemReader(path).read_metadata().storage_data
    except Exception as e:
        return f"{meta} is damaged ({type(e).__name__})"
    need = {}
    for info in storage.values():
        need[info.relative_path] = max(need.get(info.relative_path, 0), info.offset + info.length)
    for rel, size in sorted(need.items()):
        shard = os.path.join(path, rel)
        have = os.path.getsize(shard) if os.path.exists(shard) else None
        if have is None:
            return f"{shard} is missing"
        if have < size:
            return f"{shard} is cut short ({have:,} of {size:,} bytes)"
    return None


def saved_at(path):
    """When a checkpoint was saved: the time recorded in its config.json (older checkpoints: the metadata's mtime)."""
    try:
        with open(os.path.join(path, "config.json")) as f:
            return float(json.load(f)["saved_at"])
    except (OSError, ValueError, KeyError, TypeError):
        meta = os.path.join(path, ".metadata")
        return os.path.getmtime(meta) if os.path.exists(meta) else 0.0


def by_save_order(out_dir):
    """Checkpoint names, oldest save first (a run restarted with --overwrite saves ckpt_250 after ckpt_5000)."""
    return sorted(names(out_dir), key=lambda n: (saved_at(os.path.join(out_dir, n)), int(n[5:])))


def read_latest(out_dir):
    try:
        with open(os.path.join(out_dir, "latest")) as f:
            return f.read().strip() or None
    except OSError:
        return None


def find(out_dir, log=print, damaged=None):
    """The checkpoint a run resumes from: the one `latest` names if it is complete; else, with one line
    saying why, the newest complete one by save order. None when out_dir holds no checkpoint at all.
    damaged: {name: what is wrong} for checkpoints that failed to load though their sizes were right.
    Raises CheckpointError when there are checkpoints but none is complete: that is never a fresh start."""
    damaged = damaged or {}
    latest, found = read_latest(out_dir), names(out_dir)
    if latest is None and not found:
        return None
    problem_of = lambda n: damaged.get(n) or verify(os.path.join(out_dir, n))
    if latest:
        problem = problem_of(latest)
        if problem is None:
            return os.path.join(out_dir, latest)
        problem = f"{out_dir}/latest names {latest}, but {problem}"
    else:
        problem = f"{out_dir}/latest is missing"
    problem = "; ".join([problem] + [why for n, why in sorted(damaged.items()) if n != latest])
    good = [n for n in by_save_order(out_dir) if n != latest and problem_of(n) is None]
    if not good:
        raise CheckpointError(f"{problem}, and {out_dir} has no other complete checkpoint: move the damaged one away "
                              f"and pass --resume=False to start over, or use a new --out_dir")
    log(f"{problem}: resuming from {good[-1]}, the newest complete checkpoint, instead")
    return os.path.join(out_dir, good[-1])


def first_line(e):
    """An error as one line; for DCP's CheckpointException, the first rank's own error inside it."""
    failures = getattr(e, "failures", None)
    if failures:
        e = next(iter(failures.values()))[0]
    return f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]}"


def unreadable(path):
    """After a load of path failed: the first shard file holding an item that does not deserialize, as one line
    naming the file; None when every item reads (then the failure was not damage). DCP stores each item as
    torch.save's bytes at an offset; they are read back as DCP reads them, one at a time."""
    import io

    import torch
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    meta = FileSystemReader(path).read_metadata()
    for index, info in sorted(meta.storage_data.items(), key=lambda kv: (kv[1].relative_path, kv[1].offset)):
        shard = os.path.join(path, info.relative_path)
        tensor = not isinstance(meta.state_dict_metadata.get(index.fqn), BytesStorageMetadata)
        try:
            with open(shard, "rb") as f:
                f.seek(info.offset)
                torch.load(io.BytesIO(f.read(info.length)), map_location="cpu", weights_only=tensor)
        except Exception as e:
            return f"{shard} is damaged: {index.fqn} at byte {info.offset:,} does not read ({type(e).__name__})"
    return None


def load(state, path, diagnose=True):
    """Read the checkpoint at path into state, in place (dcp.load; any number of processes may have written it).
    Raises Damaged naming the file when one does not read (diagnose=False skips that search: for the ranks that
    do not report), else CheckpointError with the error DCP met. DCP's CheckpointException derives from
    BaseException, so `except Exception` alone would let it through as a traceback."""
    import warnings

    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException

    try:
        with warnings.catch_warnings():  # DCP warns that it runs without a process group: that is intended
            warnings.simplefilter("ignore", UserWarning)
            dcp.load(state, checkpoint_id=path)
    except (Exception, CheckpointException) as e:
        problem = unreadable(path) if diagnose else None
        if problem:
            raise Damaged(problem) from None
        raise CheckpointError(f"cannot read {path} ({first_line(e)})") from None


def no_space(err, path):
    """One line when err, raised while writing path, is a full filesystem (which one, how much is free, which
    file), else None. A full disk hides behind other errors: DCP wraps it in a CheckpointException, torch.save's
    zip writer in a RuntimeError ("unexpected pos"), numpy in an OSError with no errno ("requested and written").
    So ENOSPC or EDQUOT anywhere along the chain counts, and so does a filesystem with under 1 MB left."""
    chain, seen, full = [err], set(), False
    while chain:
        e = chain.pop()
        if id(e) in seen:
            continue
        seen.add(id(e))
        full = full or getattr(e, "errno", None) in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC))
        chain += [x for x in (e.__cause__, e.__context__) if x is not None]
        chain += [exc for exc, _ in getattr(e, "failures", {}).values()]
    where = os.path.abspath(path)
    while not os.path.isdir(where):
        where = os.path.dirname(where)
    free = shutil.disk_usage(where).free
    if not full and free >= 2**20:
        return None
    mount = os.path.realpath(where)
    while not os.path.ismount(mount):
        mount = os.path.dirname(mount)
    return f"no space left on {mount} ({free / 1e6:.1f} MB free) writing {path}"


def unwritable(path):
    """One line when nothing can be written at path (a read-only filesystem, no permission), else None. Checked
    before any work and without creating anything: where path does not exist yet, its nearest existing parent is
    tried, with a file that has no name (O_TMPFILE) where the OS has them, removed at once elsewhere."""
    where = os.path.abspath(path)
    while not os.path.isdir(where):
        where = os.path.dirname(where)
    try:
        tempfile.TemporaryFile(dir=where).close()
    except OSError as e:
        return f"{path} cannot be written ({e.strerror}{'' if where == os.path.abspath(path) else f' at {where}'})"
    return None


def write_atomic(path, data, sync=True):
    """path written whole or not at all, the one way every script replaces a file: data (bytes, text, or a function
    that writes into the open binary file) goes to path.tmp, which is renamed over path; a reader sees the old file or
    the new one, never a part. sync: fsync before the rename, so that a power loss cannot leave an empty file either
    (7 ms a file on this project's machine: the heartbeat, rewritten every second, skips it). On an error path.tmp
    is removed and the error raised (no_space says whether it was a full disk)."""
    tmp = path + ".tmp"
    try:
        with open(tmp, "wb") as f:
            if callable(data):
                data(f)
            else:
                f.write(data.encode() if isinstance(data, str) else data)
            if sync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def save(out_dir, iter_num, state, config, master, barrier):
    """Write out_dir/ckpt_<iter_num>/ (every rank writes its shards; DCP's save is collective), verify it,
    then rename it into place and point `latest` at it. It is written under a temporary name first, so a
    kill at any moment leaves the previous checkpoint and `latest` as they were. A save that fails is removed
    at once; on a full disk it raises DiskFull (one line), on every rank (DCP shares a failed write with all)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException

    name = f"ckpt_{iter_num}"
    final, tmp, old = (os.path.join(out_dir, n) for n in (name, f".{name}.tmp", f".{name}.old"))
    if master:
        shutil.rmtree(tmp, ignore_errors=True)
    barrier()
    try:
        dcp.save(state, checkpoint_id=tmp)
        if master:
            write_atomic(os.path.join(tmp, "config.json"), json.dumps({**config, "saved_at": time.time()}))
            problem = verify(tmp)
            if problem:
                raise CheckpointError(f"the checkpoint just written is not readable: {problem}; latest still names the previous one")
            if os.path.exists(final):  # the same iteration saved again (latest does not name it): swap, never delete first
                os.rename(final, old)
            os.rename(tmp, final)
            write_atomic(os.path.join(out_dir, "latest"), name)
            shutil.rmtree(old, ignore_errors=True)
    except (Exception, CheckpointException) as e:
        ranks = list(getattr(e, "failures", {}))  # DCP: the ranks whose write failed, each writing __<rank>_0.distcp
        full = no_space(e, os.path.join(tmp, f"__{ranks[0]}_0.distcp") if ranks else getattr(e, "filename", None) or tmp)
        if master:
            shutil.rmtree(tmp, ignore_errors=True)
        if full is None:
            raise
        last = read_latest(out_dir)
        last_dir = os.path.join(out_dir, last or "")
        size = sum(f.stat().st_size for f in os.scandir(last_dir)) if last and os.path.isdir(last_dir) else 0
        raise DiskFull(f"{full} (a checkpoint here takes {size / 1e6:.1f} MB; the partial save is removed, latest still "
                       f"names {last or 'none'})") from None
    barrier()
    return final


def prune(out_dir, keep_last_n):
    """Remove all but the keep_last_n newest checkpoints by save order; never the one `latest` names, nor any
    saved after it."""
    if keep_last_n <= 0:
        return []
    order = by_save_order(out_dir)
    latest = read_latest(out_dir)
    protected = set(order[-keep_last_n:]) | (set(order[order.index(latest):]) if latest in order else set(order))
    gone = [n for n in order if n not in protected]
    for n in gone:
        shutil.rmtree(os.path.join(out_dir, n), ignore_errors=True)
    return gone


def remove_leftovers(out_dir, log=print):
    """Temporary folders of saves that were cut short (a kill mid-save): never complete, never named by latest."""
    for n in sorted(os.listdir(out_dir)) if os.path.isdir(out_dir) else []:
        if n.startswith(".ckpt_") and n.endswith((".tmp", ".old")):
            shutil.rmtree(os.path.join(out_dir, n), ignore_errors=True)
            log(f"removed {os.path.join(out_dir, n)}, left by a save that was cut short")


def lock(out_dir):
    """Take out_dir's writer lock and keep it for the life of the process: an advisory flock, which the OS
    releases when the holder exits or is killed (kill -9 leaves no stale lock). Returns the open file, or
    raises CheckpointError naming the pid that holds it. Where there is no flock (Windows), no lock."""
    try:
        import fcntl
    except ImportError:
        return None
    f = open(os.path.join(out_dir, ".lock"), "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.seek(0)
        pid = f.read().strip() or "unknown"
        f.close()
        raise CheckpointError(in_use(out_dir, pid))
    f.seek(0)
    f.truncate()
    f.write(str(os.getpid()))
    f.flush()
    return f


def holder(out_dir):
    """The pid (as text) of the process holding out_dir's lock, or None: a check that takes nothing."""
    try:
        import fcntl

        f = open(os.path.join(out_dir, ".lock"))
    except (ImportError, OSError):
        return None
    with f:
        try:
            fcntl.flock(f, fcntl.LOCK_SH | fcntl.LOCK_NB)  # refused while a writer holds LOCK_EX
            return None
        except OSError:
            return f.read().strip() or "unknown"


def in_use(out_dir, pid):
    return f"{out_dir} is in use by another training run (pid {pid}): one writer per out_dir; wait for it, stop it, or use another --out_dir"
