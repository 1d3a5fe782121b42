"""Committed weight files kept in the repository's history instead of its working tree.

The working tree travels whole to a GPU machine, within 64 MiB together with the 18.6 MB of
data a campaign needs (tests/test_weights_archive.py checks it). So ``results/`` keeps in its
tree only the fp16 ``last.safetensors`` and ``best.safetensors`` of each group's seed-0 runs
(under 1 MB each: ``otlt eval`` on them reproduces their ``eval.json``). Every other weight
file a collection writes (the runs of seeds 1 and up, the ``kept/`` epochs) is committed
once and then archived: untracked, and recorded in ``results/weights_archive.json`` with the
commit that holds it and its SHA-256. ``restore`` writes such files back from that commit;
``.gitignore`` covers them, so a restored file is neither committed again nor sent to a
device::

    python scripts/weights_archive.py restore [PREFIX ...]  # all archived files, or those under
                                                            # the given paths (--force: also
                                                            # over a different file on disk)
    python scripts/weights_archive.py archive PATH ...      # after a commit that holds PATHs
                                                            # (a folder: its files that
                                                            # .gitignore covers); then commit
    python scripts/weights_archive.py check                 # every entry is in the history

A shallow clone lacks the commits: ``git fetch --unshallow`` first. The recorded commits must
stay in main's history: a squash or rebase of them loses the files (``check`` and its test
fail then, as they require each commit to be an ancestor of HEAD).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MANIFEST = "results/weights_archive.json"


def git(*args: str, root: Path = ROOT, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["git", *args], cwd=root, capture_output=True, check=check)


def read_manifest(root: Path = ROOT) -> dict[str, dict]:
    """``{path: {"commit", "sha256", "bytes"}}`` (empty when there is no manifest yet)."""
    path = root / MANIFEST
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())["files"]
    except (ValueError, KeyError) as err:
        raise SystemExit(f"weights_archive: {MANIFEST} is damaged ({err!r}): git checkout "
                         "it from HEAD") from None


def write_manifest(files: dict[str, dict], root: Path = ROOT) -> None:
    text = json.dumps({"about": "weights kept in git history: scripts/weights_archive.py",
                       "files": dict(sorted(files.items()))}, indent=1) + "\n"
    (root / MANIFEST).write_text(text)


def repo_path(path: str, root: Path = ROOT) -> str:
    """``path`` (relative to the current folder, or absolute) as a manifest key: relative to
    the repository's root, with forward slashes."""
    try:
        return Path(path).resolve().relative_to(root.resolve()).as_posix()
    except ValueError:
        raise SystemExit(f"weights_archive: {path} is outside the repository {root}") from None


def ignore_sources(paths: list[str], root: Path = ROOT) -> dict[str, str]:
    """``{path: the file whose pattern ignores it}`` for each of ``paths`` (relative to
    ``root``) that git ignores, tracked or not; a path a ``!`` pattern re-includes is not
    ignored. One ``git check-ignore`` for all of them."""
    if not paths:
        return {}
    got = subprocess.run(["git", "check-ignore", "-v", "-z", "--no-index", "--stdin"],
                         cwd=root, input="\0".join(paths).encode(), capture_output=True)
    if got.returncode not in (0, 1):  # 1: none of them is ignored
        raise SystemExit(f"weights_archive: git check-ignore failed: {got.stderr.decode()}")
    fields = got.stdout.decode().split("\0")  # source, line, pattern, path; repeated
    records = [fields[i:i + 4] for i in range(0, len(fields) - 3, 4)]
    return {path: source for source, _, pattern, path in records
            if not pattern.startswith("!")}


def gitignored(paths: list[str], root: Path = ROOT) -> list[str]:
    """Those of ``paths`` that a ``.gitignore`` of the repository covers (not a user's own
    ``core.excludesFile`` or ``.git/info/exclude``, which a clone does not share), sorted."""
    return sorted(path for path, source in ignore_sources(paths, root).items()
                  if Path(source).name == ".gitignore")


def tracked(path: str, root: Path = ROOT) -> bool:
    return not git("ls-files", "--error-unmatch", path, root=root, check=False).returncode


def blob(commit: str, path: str, root: Path = ROOT) -> bytes:
    """The bytes of ``path`` at ``commit``; SystemExit naming the fix when it is missing."""
    got = git("cat-file", "blob", f"{commit}:{path}", root=root, check=False)
    if got.returncode:
        shallow = git("rev-parse", "--is-shallow-repository", root=root).stdout.strip()
        hint = (" (a shallow clone: git fetch --unshallow)" if shallow == b"true" else
                " (was that commit squashed or rebased away?)")
        raise SystemExit(f"weights_archive: {path} is not in commit {commit[:12]}{hint}")
    return got.stdout


def covered_files(folder: str, root: Path = ROOT) -> list[str]:
    """The tracked files under ``folder`` that .gitignore covers (what archiving it takes)."""
    tracked = git("ls-files", "-z", "--", folder, root=root).stdout.decode().split("\0")
    return gitignored([p for p in tracked if p], root)


def archive(paths: list[str], root: Path = ROOT) -> list[str]:
    """Untrack ``paths`` (committed and unchanged in HEAD, covered by .gitignore; a folder
    stands for its files that .gitignore covers) and record them in the manifest; the files
    stay on disk. Returns the archived paths."""
    paths = [repo_path(p, root) if Path(p).is_absolute() or Path(p).exists() else p
             for p in paths]
    paths = [f for p in paths for f in ((covered_files(p, root) or [p])
                                        if (root / p).is_dir() else [p])]
    head = git("rev-parse", "HEAD", root=root).stdout.decode().strip()
    files = read_manifest(root)
    for path in paths:
        if not tracked(path, root):
            raise SystemExit(f"weights_archive: {path} is not tracked: commit it first")
        if git("diff", "--quiet", "HEAD", "--", path, root=root, check=False).returncode:
            raise SystemExit(f"weights_archive: {path} differs from HEAD: commit it first")
        if not gitignored([path], root):
            raise SystemExit(f"weights_archive: .gitignore does not cover {path}, so a restored "
                             "copy would be committed again or sent to a device: add a pattern")
        data = blob(head, path, root)
        files[path] = {"commit": head, "sha256": hashlib.sha256(data).hexdigest(),
                       "bytes": len(data)}
    git("rm", "--cached", "-q", "--", *paths, root=root)
    write_manifest(files, root)
    git("add", MANIFEST, root=root)
    return paths


def restore(prefixes: list[str], root: Path = ROOT, force: bool = False) -> list[str]:
    """Write back the archived files under ``prefixes`` (paths from the current folder; all
    files when empty) whose copy on disk is missing; each is checked against its SHA-256. A
    file tracked again is left alone, and so is a different file on disk (a new collection's
    weights, which git holds nowhere yet) unless ``force``. Returns those written."""
    keys = [repo_path(p, root) for p in prefixes]
    files = read_manifest(root)
    chosen = [path for path in files
              if not keys or any(path == k or path.startswith(k.rstrip("/") + "/")
                                 for k in keys)]
    if keys and not chosen:
        raise SystemExit(f"weights_archive: no archived file under {', '.join(prefixes)}")
    written = []
    for path in chosen:
        entry = files[path]
        if tracked(path, root):
            print(f"weights_archive: {path} is tracked again: left as it is", file=sys.stderr)
            continue
        target = root / path
        if target.is_file():
            if hashlib.sha256(target.read_bytes()).hexdigest() == entry["sha256"]:
                continue
            if not force:
                print(f"weights_archive: {path} on disk differs from the archived file: left "
                      "as it is (--force replaces it)", file=sys.stderr)
                continue
        data = blob(entry["commit"], path, root)
        if hashlib.sha256(data).hexdigest() != entry["sha256"]:
            raise SystemExit(f"weights_archive: {path} at {entry['commit'][:12]} does not "
                             "match its recorded SHA-256")
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(target.name + ".restoring")  # whole or absent: an
        partial.write_bytes(data)  # interrupted restore leaves no short file to protect
        os.replace(partial, target)
        written.append(path)
    return written


def check(root: Path = ROOT) -> list[str]:
    """Problems of the manifest: an entry tracked again, not covered by .gitignore, recorded
    at a commit outside HEAD's history (a squash or rebase), or not there with its SHA-256
    (empty: none)."""
    problems = []
    files = read_manifest(root)
    covered = set(gitignored(list(files), root))
    for path, entry in files.items():
        if tracked(path, root):
            problems.append(f"{path} is tracked again")
        if path not in covered:
            problems.append(f"{path} is not covered by .gitignore")
        if git("merge-base", "--is-ancestor", entry["commit"], "HEAD", root=root,
               check=False).returncode:
            problems.append(f"{path}: commit {entry['commit'][:12]} is not in HEAD's history")
        try:
            data = blob(entry["commit"], path, root)
        except SystemExit as missing:
            problems.append(str(missing).removeprefix("weights_archive: "))
            continue
        if hashlib.sha256(data).hexdigest() != entry["sha256"]:
            problems.append(f"{path} at {entry['commit'][:12]} does not match its SHA-256")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    restore_parser = sub.add_parser("restore", help="write archived weights back")
    restore_parser.add_argument("prefixes", nargs="*", metavar="PREFIX",
                                help="only files under these paths")
    restore_parser.add_argument("--force", action="store_true",
                                help="also replace a file on disk that differs")
    sub.add_parser("archive", help="untrack committed weights, record them").add_argument(
        "paths", nargs="+", metavar="PATH")
    sub.add_parser("check", help="every manifest entry is in the history")
    args = parser.parse_args(argv)
    if args.command == "restore":
        written = restore(args.prefixes, force=args.force)
        print(f"weights_archive: {len(written)} file(s) restored")
    elif args.command == "archive":
        done = archive(args.paths)
        print(f"weights_archive: {len(done)} file(s) archived; commit {MANIFEST}")
    else:
        problems = check()
        for line in problems:
            print(f"weights_archive: {line}", file=sys.stderr)
        return 1 if problems else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
