"""Checks on the patch series in patches/ (no build; needs git and a pristine tree).

  1. it applies, in order, to a copy of the pristine tree's touched files (build.apply_series);
  2. with --against REV: every file it produces is byte-identical to what the series of git
     revision REV produces, and both touch the same files (a re-cut or a rebase that must not
     change the compiled tree);
  3. no patch removes or rewrites a line that an earlier patch added: each line of the tree is
     tagged with the patch that added it while the hunks are replayed, and a '-' line of a
     later patch must be a pristine line.

Usage: python3 scripts/check-series.py [--pristine DIR] [--against REV]
DIR defaults to $POWERINFER_ATTN_VENDOR/pristine or vendor/pristine (made by `powerinfer-attn
build`). Exit status 1 when a check fails.
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from powerinfer_attn.native.build import apply_series, read_series  # noqa: E402


def apply_to(patches_dir: Path, pristine: Path, out: Path) -> set[str]:
    out.mkdir(parents=True)
    return apply_series(read_series(patches_dir), pristine, out, log=lambda _msg: None)


def series_at(rev: str, dest: Path) -> Path:
    """patches/ as of git revision rev, written to dest."""
    dest.mkdir(parents=True)
    names = subprocess.run(["git", "ls-tree", "--name-only", f"{rev}:patches"], cwd=REPO,
                           capture_output=True, text=True, check=True).stdout.split()
    for name in names:
        data = subprocess.run(["git", "show", f"{rev}:patches/{name}"], cwd=REPO,
                              capture_output=True, check=True).stdout
        (dest / name).write_bytes(data)
    return dest


def compare(new_dir: Path, old_dir: Path, pristine: Path, tmp: Path) -> bool:
    a, b = tmp / "new", tmp / "old"
    ta, tb = apply_to(new_dir, pristine, a), apply_to(old_dir, pristine, b)
    ok = True
    if ta != tb:
        ok = False
        print(f"touched files differ: only new {sorted(ta - tb)}, only old {sorted(tb - ta)}")
    same = 0
    for rel in sorted(ta | tb):
        da = (a / rel).read_bytes() if (a / rel).is_file() else None
        db = (b / rel).read_bytes() if (b / rel).is_file() else None
        if da != db:
            ok = False
            print(f"DIFFERS {rel}")
        else:
            same += 1
    print(f"identical tree: {same}/{len(ta | tb)} touched files byte-identical, "
          f"same set of touched files: {ta == tb}")
    return ok


_HUNK = re.compile(r"^@@ -(\d+)(?:,(\d+))? \+(\d+)(?:,(\d+))? @@")


def file_diffs(text: str):
    """(old path or None, new path or None, [hunk lines]) per file of a git diff."""
    start = text.find("\ndiff --git ")
    lines = text[start + 1:].split("\n") if start >= 0 else []
    out, cur = [], None
    for line in lines:
        if line.startswith("diff --git "):
            cur = [None, None, []]
            out.append(cur)
        elif cur is None:
            continue
        elif line.startswith("--- ") and not cur[2]:
            cur[0] = None if line[4:] == "/dev/null" else line[6:]
        elif line.startswith("+++ ") and not cur[2]:
            cur[1] = None if line[4:] == "/dev/null" else line[6:]
        elif line.startswith("@@") or cur[2]:
            cur[2].append(line)
    return out


def no_undo(patches: list[Path], pristine: Path, applied: Path | None = None) -> bool:
    """Replays the series with every line tagged by its origin; a '-' must remove a pristine line.
    With ``applied`` (the tree apply_series made), the replay must have made the same files."""
    trees: dict[str, list[tuple[str, str]]] = {}
    bad = 0
    removed = {}
    for p in patches:
        removed[p.name] = 0
        for old, new, body in file_diffs(p.read_text()):
            path = new or old
            if path not in trees:
                src = pristine / (old or new)
                trees[path] = [(l, "pristine") for l in src.read_text().split("\n")[:-1]] if old else []
            lines = trees[path]
            hunks, i = [], 0
            while i < len(body):
                m = _HUNK.match(body[i])
                i += 1
                if not m:
                    continue
                n = int(m.group(2)) if m.group(2) is not None else 1
                ops = []
                while i < len(body) and not body[i].startswith("@@"):
                    if body[i][:1] in (" ", "-", "+"):
                        ops.append((body[i][0], body[i][1:]))
                    i += 1
                hunks.append((int(m.group(1)) - 1 if n > 0 else int(m.group(1)), ops))
            out, pos, shift = [], 0, 0
            for want, ops in hunks:
                pre = [t for op, t in ops if op != "+"]
                # where the preimage is, nearest the stated line first (git apply's offsets)
                at = None
                for d in range(len(lines) + 1):
                    for c in (want + shift + d, want + shift - d):
                        if pos <= c <= len(lines) - len(pre) and [t for t, _ in lines[c:c + len(pre)]] == pre:
                            at = c
                            break
                    if at is not None:
                        break
                assert at is not None, f"{p.name}: a hunk of {path} does not apply"
                shift = at - want
                out.extend(lines[pos:at])
                pos = at
                for op, t in ops:
                    if op == " ":
                        out.append(lines[pos])
                        pos += 1
                    elif op == "-":
                        removed[p.name] += 1
                        if lines[pos][1] != "pristine":
                            bad += 1
                            print(f"UNDO {p.name} {path}: removes a line of {lines[pos][1]}: {t!r}")
                        pos += 1
                    else:
                        out.append((t, p.name))
            out.extend(lines[pos:])
            trees[path] = out
    for name, n in removed.items():
        print(f"  {name}: {n} '-' lines, all pristine" if n and not bad else f"  {name}: {n} '-' lines")
    if applied is not None:
        for path, lines in trees.items():
            if "".join(t + "\n" for t, _ in lines) != (applied / path).read_text():
                bad += 1
                print(f"the replay of {path} differs from git apply's result")
    print(f"no-undo: {'OK' if bad == 0 else f'{bad} lines added by an earlier patch are removed'}")
    return bad == 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    vendor = Path(os.environ.get("POWERINFER_ATTN_VENDOR", REPO / "vendor"))
    ap.add_argument("--pristine", type=Path, default=vendor / "pristine")
    ap.add_argument("--against", metavar="REV", help="compare the applied tree with the series of this git revision")
    args = ap.parse_args()
    patches_dir = REPO / "patches"
    ok = True
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        touched = apply_to(patches_dir, args.pristine, tmp / "applied")
        names = [p.name for p in read_series(patches_dir)]
        print(f"series applies in order: {len(names)} patches, {len(touched)} files")
        if args.against:
            ok &= compare(patches_dir, series_at(args.against, tmp / "old-patches"), args.pristine, tmp)
        ok &= no_undo(read_series(patches_dir), args.pristine, tmp / "applied")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
