#!/usr/bin/env python3
"""Helper of scripts/compare-heads.sh: bitwise comparison of two training runs, and step times.

    compare_heads.py runs NAME RUN_A RUN_B [--what "old vs new"]
        Compares every step's metrics (loss, grad_norm, val_loss and every other logged number
        except wall-clock and memory figures) as float bits, and the final checkpoint's
        model.safetensors and optim.safetensors tensor by tensor. Prints one line,
        `RUN NAME: BITWISE EQUAL (...)` or `RUN NAME: DIFFERS ...`; exit 0 / 1.
    compare_heads.py steptime [--skip N] RUN_DIR...
        Prints the median `step_time_s` in ms over the train steps after the first N (default 2)
        of all the given runs together, and the number of steps it is taken over.

The metrics JSON prints each f32 widened to f64 in shortest round-trip form, so Python's
float of the text holds exactly the logged value and comparing the f64 bits is bit equality.
"""
import hashlib
import json
import statistics
import struct
import sys
from pathlib import Path

# Numbers that depend on the machine's timing or allocator, not on the arithmetic.
NOT_COMPARED = {"elapsed_s", "step_time_s", "tokens_per_s", "peak_memory_mib"}
# Numbers every train step (loss, grad_norm) or eval step (val_loss) must carry on both sides.
REQUIRED_TRAIN = ("loss", "grad_norm")


def flatten(value, prefix, out):
    """Numeric leaves of a JSON value under dotted/indexed paths (moe[0].balance_loss)."""
    if isinstance(value, dict):
        for k, v in value.items():
            flatten(v, f"{prefix}.{k}" if prefix else k, out)
    elif isinstance(value, list):
        for i, v in enumerate(value):
            flatten(v, f"{prefix}[{i}]", out)
    elif isinstance(value, bool) or value is None or isinstance(value, str):
        out[prefix] = value
    elif isinstance(value, (int, float)):
        out[prefix] = value


def load_metrics(run):
    """{step: {path: value}} over every line of the run's metrics.jsonl (train and eval lines)."""
    steps = {}
    with open(Path(run) / "metrics.jsonl") as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            rec = json.loads(line)
            step = rec.get("step")
            if step is None:
                continue
            leaves = {}
            flatten({k: v for k, v in rec.items() if k not in NOT_COMPARED and k != "step"}, "", leaves)
            row = steps.setdefault(step, {})
            for k, v in leaves.items():
                # Every value a step logs under a key (train and eval lines do not share keys).
                row.setdefault(k, []).append(v)
    return steps


def bits(values):
    """Numbers as f64 bit patterns (an int and the float of the same value compare equal: a
    changed print format is not a changed number); bools and strings as they are."""
    num = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)  # noqa: E731
    return [("f", struct.pack("<d", float(v))) if num(v) else ("v", v) for v in values]


def fmt(values):
    return " ".join(repr(v) for v in values)


def compare_metrics(a, b):
    """(None, summary) when equal, else (first difference, None)."""
    sa, sb = sorted(a), sorted(b)
    if sa != sb:
        only_a, only_b = sorted(set(sa) - set(sb)), sorted(set(sb) - set(sa))
        return f"steps differ: only old {only_a[:5]}, only new {only_b[:5]}", None
    train_steps, notes = 0, set()
    for s in sa:
        ra, rb = a[s], b[s]
        if "loss" in ra or "loss" in rb:
            train_steps += 1
            for k in REQUIRED_TRAIN:
                if k not in ra or k not in rb:
                    return f"at step {s}: {k} missing on the {'old' if k not in ra else 'new'} side", None
        for k in ("val_loss",):
            if (k in ra) != (k in rb):
                return f"at step {s}: {k} missing on the {'old' if k not in ra else 'new'} side", None
        # The headline numbers first, so the line names the loss when it differs.
        first = [k for k in ("loss", "val_loss", "grad_norm") if k in ra and k in rb]
        for k in first + sorted((set(ra) & set(rb)) - set(first)):
            if bits(ra[k]) != bits(rb[k]):
                return f"at step {s}: {k} old {fmt(ra[k])} new {fmt(rb[k])}", None
        for k in set(ra) ^ set(rb):
            notes.add(k)
    return None, (train_steps, sorted(notes))


def sha256(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def safetensors_parts(path):
    """(metadata, {name: (dtype, shape, data bytes)}) of a safetensors file."""
    raw = Path(path).read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    data = raw[8 + n :]
    meta = header.pop("__metadata__", None)
    tensors = {}
    for name, t in header.items():
        lo, hi = t["data_offsets"]
        tensors[name] = (t["dtype"], tuple(t["shape"]), data[lo:hi])
    return meta, tensors


def final_checkpoint(run):
    ckpts = sorted((Path(run) / "checkpoints").glob("step_*"))
    return ckpts[-1] if ckpts else None


def compare_checkpoints(run_a, run_b):
    """(None, note) when the final checkpoints' tensors are bitwise equal, else (difference, None)."""
    ca, cb = final_checkpoint(run_a), final_checkpoint(run_b)
    if ca is None or cb is None:
        return "no final checkpoint on the " + ("old" if ca is None else "new") + " side", None
    if ca.name != cb.name:
        return f"final checkpoints differ: old {ca.name} new {cb.name}", None
    notes = []
    for fname in ("model.safetensors", "optim.safetensors"):
        fa, fb = ca / fname, cb / fname
        if not fa.exists() or not fb.exists():
            return f"{ca.name}/{fname} missing on the {'old' if not fa.exists() else 'new'} side", None
        if sha256(fa) == sha256(fb):
            continue
        ma, ta = safetensors_parts(fa)
        mb, tb = safetensors_parts(fb)
        if sorted(ta) != sorted(tb):
            return f"{fname}: tensor names differ (only old {sorted(set(ta) - set(tb))[:3]}, only new {sorted(set(tb) - set(ta))[:3]})", None
        for name in sorted(ta):
            if ta[name] != tb[name]:
                return f"{fname}: tensor {name} differs", None
        # Tensors equal: the header (metadata, e.g. the model config's JSON, or order) differs.
        notes.append(f"{fname} tensors equal but header differs" + (" (metadata)" if ma != mb else ""))
    return None, "; ".join(notes) if notes else f"{ca.name} files identical"


def cmd_runs(args):
    what = None
    if "--what" in args:
        i = args.index("--what")
        what = args[i + 1]
        del args[i : i + 2]
    if len(args) != 3:
        print(__doc__, file=sys.stderr)
        return 2
    name, run_a, run_b = args
    label = f"RUN {name}" + (f" ({what})" if what else "")
    diff, summary = compare_metrics(load_metrics(run_a), load_metrics(run_b))
    if diff:
        print(f"{label}: DIFFERS {diff}")
        return 1
    cdiff, cnote = compare_checkpoints(run_a, run_b)
    if cdiff:
        print(f"{label}: DIFFERS in the final checkpoint: {cdiff}")
        return 1
    steps, only_one_side = summary
    extra = f"; logged on one side only: {', '.join(only_one_side)}" if only_one_side else ""
    print(f"{label}: BITWISE EQUAL ({steps} steps; {cnote}{extra})")
    return 0


def cmd_steptime(args):
    skip = 2
    if "--skip" in args:
        i = args.index("--skip")
        skip = int(args[i + 1])
        del args[i : i + 2]
    times = []
    for run in args:
        with open(Path(run) / "metrics.jsonl") as f:
            for line in f:
                if line.strip():
                    rec = json.loads(line)
                    if "step_time_s" in rec and rec.get("step", 0) > skip:
                        times.append(rec["step_time_s"])
    if not times:
        print("no step times", file=sys.stderr)
        return 1
    print(f"{statistics.median(times) * 1e3:.2f} {len(times)}")
    return 0


def main():
    if len(sys.argv) < 2 or sys.argv[1] not in ("runs", "steptime"):
        print(__doc__, file=sys.stderr)
        return 2
    return {"runs": cmd_runs, "steptime": cmd_steptime}[sys.argv[1]](sys.argv[2:])


if __name__ == "__main__":
    sys.exit(main())
