"""The plan of the two GPU calls (issue #34): the time budget of every part, built from the H200
figures committed in benchmarks/results/nvidia-h200-* plus named estimates and margins; the pinned
wheels the device's image lacks and the check that refuses any other set; the size of what a call
carries (the tree and its `carry` paths) against the device tool's 64 MiB. docs/gpu.md holds the
budget table this module prints (tests/test_benchmarks.py checks the two agree); gpu_run.py takes
the recipe's epochs, its pretraining deadline and the speed call's reserves from here.

  python benchmarks/gpu_plan.py table            # the budget tables (markdown), as in docs/gpu.md
  python benchmarks/gpu_plan.py check recipe     # before call 1: wheels, the pack, the size
  python benchmarks/gpu_plan.py check speed      # before call 2: wheels, the size
  python benchmarks/gpu_plan.py wheels .whl      # the wheel check alone (gpu_run.sh, on the device)

Stdlib only: it runs in the device's image before any wheel is installed.
"""

import argparse
import json
import os
import re
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
RESULTS = os.path.join(HERE, "results")
PINS = os.path.join(HERE, "device_wheels.txt")
WHEELS = ".whl"
PACK = ".devdata/cifar10_pack"  # python -m simclr_jax.data.pack --tfds cifar10 ... (docs/gpu.md)
TRAVEL_LIMIT = 64 * 2**20  # bytes a call may carry: the tree, shared/ and the carry paths
CARRY = {"recipe": [WHEELS, PACK], "speed": [WHEELS]}

# The device tool's limits (its README): device time of a session, one command's run.
SESSION_S = 900
COMMAND_S = 600

# What the recipe call runs (configs/cifar_simclr.py on all of CIFAR-10).
TRAIN, TEST, BATCH = 50_000, 10_000, 512
KNN_EVERY = 25  # epochs between the kNN monitor's checks (the curve's points)
DOWNSTREAM_EPOCHS = 10  # fine-tune vs scratch, each

# The committed H200 runs the budget is built from (jax 0.11.2, bf16 ResNet-18, batch 512, 15,000
# train / 5,000 test images): the in-memory run (MINUTES=4) and the streamed one (MINUTES=2).
H200_RUNS = (
    "nvidia-h200-cifar10-resnet18-bfloat16-recipe.json",
    "nvidia-h200-streamed/nvidia-h200-cifar10-resnet18-bfloat16-recipe.json",
)

# Estimates: what no committed H200 run timed. Each is a guess with its reason; the first call
# times every part (gpu_run's record), and these are then replaced by what it measured.
STARTUP_S = 120  # the machine's start: "a minute or more" (the device tool's README); not timed
TRANSFER_S = 15  # each call's upload (~62 MiB for call 1) and the files back; not timed
SETUP_S = 15  # gpu_run.sh: wheels into /tmp/site, nvidia-smi, the libraries' versions
DATA_S = 20  # open the pack, decode its 60,000 JPEGs into memory: 16.9 s on this loaded 2-vCPU CPU
CACHE_S = 5  # the run's step read back from the compilation cache, and the 5 timed steps
KNN_VOTE_S = 1  # the kNN vote, 10,000 test against 50,000 train features (0.5 TFLOP, top-200)
INIT_S = 5  # the network's initialisation for the kNN at step 0
CHECKPOINT_S = 2  # one classifier checkpoint (45 MB, orbax) at the end of each run
WRITE_S = 5  # pretrain.png, the JSON
MARGIN_S = 30  # for what the rows above miss
PROCESS_S = 15  # a speed part's process: python, jax (and torch), CUDA's initialisation
PEAK_S = 5  # the 16384^2 peak matmul: compile, warm-up, its samples around the timed steps
LOWER_S = 5  # the step lowered once more for XLA's FLOP count
STEPS = 12  # throughput.py: 2 warm-up + 10 timed steps
TORCH_STEPS = 66  # vs_torch.py: 3 warm-up + 30 timed steps, each side
TORCH_COMPILE_S = 90  # torch.compile's first compile (inductor, forward + loss + backward)
EAGER_WARMUP_S = 10  # cuDNN's autotuner over the first eager steps
FLOAT32_SLOWER = 3  # the float32 step against bf16 (TF32 matmuls at half bf16's rate, and more)
HELD_BACK_S = 45  # after call 2's deadline: its transfers, a last part's kill grace, give_back

# Each call's deadline (seconds after its command starts): call 1 ends by 9 minutes; call 2 gets
# what the session has left (its command: DEADLINE_S = status's budget_left_s - HELD_BACK_S).
RECIPE_DEADLINE_S = 540
DEADLINES = {
    "recipe": RECIPE_DEADLINE_S,
    "speed": SESSION_S - STARTUP_S - TRANSFER_S - RECIPE_DEADLINE_S - HELD_BACK_S,
}


def measured(results_dir: str = RESULTS) -> dict:
    """The figures every budget is built from, read from the committed H200 runs: the compile of
    the pretrain step (the larger of the two), the streamed run's timed rate and its median rate
    over the whole run (the streamed path's), the features of its 20,000 images and the probe on
    its 15,000 labels (first calls, compiles included; the larger of the two runs)."""
    runs = []
    for name in H200_RUNS:
        with open(os.path.join(results_dir, name)) as f:
            runs.append(json.load(f))
    streamed = runs[1]
    assert {r["device"] for r in runs} == {"NVIDIA H200"}, [r["device"] for r in runs]
    return {
        "compile_s": max(r["first_compile_s"] for r in runs),
        "timed_images_per_s": streamed["timed_images_per_s"],
        "streamed_images_per_s": streamed["images_per_s"],
        "features_s": max(r["features_s"] for r in runs),
        "features_images": streamed["train_images"] + streamed["test_images"],
        "probe_s": max(r["linear_probe_s"] for r in runs),
        "probe_labels": streamed["train_images"],
    }


def _pass_s(m: dict, images: int) -> float:
    """Seconds to move `images` through an evaluation pass after its compile: at the streamed
    training rate, which the same host path delivers with six times the device work per image."""
    return images / m["streamed_images_per_s"]


def knn_checks(epochs: int) -> int:
    return epochs // KNN_EVERY


def check_s(m: dict) -> float:
    """One check of the kNN monitor after its compile: features of every train and test image,
    and the vote (recipe_run's --knn-check-s)."""
    return _pass_s(m, TRAIN + TEST) + KNN_VOTE_S


def monitor_s(m: dict, epochs: int) -> float:
    """The kNN monitor: its first check's compile (the measured first features call), then each
    check."""
    n = knn_checks(epochs)
    return (m["features_s"] + n * check_s(m)) if n else 0.0


def recipe_rows(m: dict, epochs: int) -> list[tuple[str, float, str]]:
    """(part, seconds, how) of call 1 for `epochs` of pretraining, in the order they run."""
    streamed, features = m["streamed_images_per_s"], m["features_s"]
    frozen = features + _pass_s(m, TRAIN + TEST) + m["probe_s"] * TRAIN / m["probe_labels"]
    ft_steps = 2 * DOWNSTREAM_EPOCHS * (TRAIN + TEST) / streamed
    return [
        ("set-up", SETUP_S, "wheels, nvidia-smi, versions (estimate)"),
        ("data", DATA_S, "the pack decoded into memory (estimate; 16.9 s on the 2-vCPU dev box)"),
        ("compile", m["compile_s"], "the run's own step (measured)"),
        ("timing", CACHE_S, "that step from the compilation cache, 5 steps (estimate)"),
        (
            "pretraining",
            epochs * TRAIN / streamed,
            f"{epochs} epochs x {TRAIN:,} / {streamed:,.0f} images/s (streamed, measured)",
        ),
        (
            "kNN monitor",
            monitor_s(m, epochs),
            f"{knn_checks(epochs)} checks: {features:.2f} s compile (measured) + each "
            f"{TRAIN + TEST:,} images at the streamed rate + {KNN_VOTE_S} s vote",
        ),
        (
            "probe + kNN",
            frozen + KNN_VOTE_S,
            f"features {features:.2f} s + {TRAIN + TEST:,} images; probe {m['probe_s']:.2f} s "
            f"x {TRAIN:,}/{m['probe_labels']:,} labels (measured, scaled)",
        ),
        (
            "fine-tune vs scratch",
            m["compile_s"] + ft_steps + features + 2 * CHECKPOINT_S,
            f"compile (as pretraining's), 2 x {DOWNSTREAM_EPOCHS} epochs + tests at the streamed "
            f"rate, test compile, 2 checkpoints",
        ),
        (
            "kNN at init",
            INIT_S + features + _pass_s(m, TRAIN + TEST) + KNN_VOTE_S,
            "init, features (as the probe's), vote",
        ),
        ("pictures, JSON", WRITE_S, "estimate"),
        ("margin", MARGIN_S, ""),
    ]


def recipe_epochs(m: dict, deadline_s: float = RECIPE_DEADLINE_S) -> int:
    """The most pretraining epochs whose call 1 ends by `deadline_s`."""
    epochs = int(deadline_s * m["streamed_images_per_s"] / TRAIN)  # an upper bound
    while epochs > 1 and sum(r[1] for r in recipe_rows(m, epochs)) > deadline_s:
        epochs -= 1
    return epochs


def pretrain_ends_s(m: dict, epochs: int) -> float:
    """Seconds after the call's start by which the plan has pretraining (monitor included) done:
    recipe_run's --pretrain-by, which cuts the epochs if the run is late or slower."""
    rows = recipe_rows(m, epochs)
    names = [r[0] for r in rows]
    return sum(r[1] for r in rows[: names.index("kNN monitor") + 1])


def speed_rows(m: dict) -> list[tuple[str, float, str]]:
    """(part, seconds, how) of call 2, in the order they run, by value: the PyTorch comparison
    (it times the project's bf16 step and its MFU too), its eager fallback, the bf16 step alone
    (its program from the compilation cache, which the comparison filled), the float32 step."""
    step_s = BATCH / m["timed_images_per_s"]
    fixed = PROCESS_S + PEAK_S
    return [
        ("set-up", SETUP_S, "as call 1"),
        (
            "torch",
            fixed + m["compile_s"] + TORCH_COMPILE_S + TORCH_STEPS * step_s,
            f"process, peaks, the project's step compiled (measured), torch.compile "
            f"{TORCH_COMPILE_S} s (estimate); gets what is left less torch_eager's time",
        ),
        (
            "torch_eager",
            fixed + CACHE_S + EAGER_WARMUP_S + TORCH_STEPS * step_s,
            "kept for it; runs only if torch failed or ran out of time",
        ),
        (
            "throughput_bfloat16",
            fixed + CACHE_S + LOWER_S + STEPS * step_s,
            "process, peak, the step from the cache, FLOP count, 12 steps",
        ),
        (
            "throughput_float32",
            fixed + m["compile_s"] + LOWER_S + STEPS * step_s * FLOAT32_SLOWER,
            f"as bf16 with a compile, steps {FLOAT32_SLOWER}x slower (estimate)",
        ),
    ]


def speed_budget(m: dict) -> dict:
    """{part: planned seconds} of call 2's parts (gpu_run's reserves and minimums)."""
    return {name: s for name, s, _ in speed_rows(m)[1:]}


def torch_minimum_s(m: dict) -> float:
    """The least time the torch part is started with: its row without torch.compile's compile,
    the one figure nobody has timed (whatever is left goes to it)."""
    return speed_budget(m)["torch"] - TORCH_COMPILE_S


def speed_minimum_s(m: dict) -> float:
    """The smallest DEADLINE_S worth a call 2: set-up, the torch part's minimum, eager's time."""
    return SETUP_S + torch_minimum_s(m) + speed_budget(m)["torch_eager"]


def session_rows() -> list[tuple[str, float, str]]:
    """The session's device time: start-up, call 1, call 2 (what is left), what is held back."""
    return [
        ("start-up", STARTUP_S, "estimate"),
        ("call 1: transfers", TRANSFER_S, "estimate (~62 MiB up)"),
        ("call 1: recipe (its deadline)", DEADLINES["recipe"], "the table below"),
        (
            "call 2: speed (its deadline)",
            DEADLINES["speed"],
            f"DEADLINE_S = budget_left_s - {HELD_BACK_S}; the machine is warm: no start-up",
        ),
        ("call 2: transfers, kill grace, give_back", HELD_BACK_S, "estimate"),
    ]


def _table(rows, total_label: str) -> list[str]:
    out = ["| part | seconds | from |", "|---|---:|---|"]
    out += [f"| {name} | {s:.1f} | {how} |" for name, s, how in rows]
    return out + [f"| **{total_label}** | **{sum(r[1] for r in rows):.1f}** | |"]


def table(m: dict | None = None) -> str:
    """The budget tables in markdown (docs/gpu.md holds this text)."""
    m = m or measured()
    epochs = recipe_epochs(m)
    rows = recipe_rows(m, epochs)
    lines = [f"Session ({SESSION_S} s of device time):", ""]
    lines += _table(session_rows(), "session")
    lines += ["", f"Call 1, recipe: {epochs} epochs fit its {RECIPE_DEADLINE_S} s:", ""]
    lines += _table(rows, "call 1")
    ends = pretrain_ends_s(m, epochs)
    lines += [
        "",
        f"(recipe_run's --pretrain-by: pretraining ends {ends:.0f} s after the call's start; "
        "fewer epochs if its timed steps say it would end later.)",
    ]
    lines += [
        "",
        f"Call 2, speed, by value until its deadline ({DEADLINES['speed']} s here; DEADLINE_S "
        "says otherwise): a part that would get less than its row is skipped.",
        "",
    ]
    lines += _table(speed_rows(m), "call 2, everything")
    least = speed_minimum_s(m)
    lines += [
        "",
        f"(torch starts with at least {torch_minimum_s(m):.0f} s, its row without the compile. "
        f"Call 2 is worth making with DEADLINE_S >= {least:.0f} s, i.e. budget_left_s >= "
        f"{least + HELD_BACK_S:.0f}.)",
    ]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- wheels


def normalise(name: str) -> str:
    """A distribution's name as PEP 503 compares names."""
    return re.sub(r"[-_.]+", "-", name).lower()


def read_pins(path: str = PINS) -> dict[str, str]:
    """{normalised name: version} of the name==version lines (comments and blanks skipped)."""
    pins = {}
    with open(path) as f:
        for line in f:
            line = line.split("#", 1)[0].strip()
            if line:
                name, version = line.split("==")
                pins[normalise(name.strip())] = version.strip()
    return pins


def check_wheels(folder: str, pins: dict[str, str]) -> list[str]:
    """What is wrong with the wheels in `folder` against the pins: a package twice, one not
    pinned, a version other than its pin, a pin without its wheel ([] when none)."""
    if not os.path.isdir(folder):
        return [f"{folder}: no such folder"]
    found: dict[str, list[str]] = {}
    names = sorted(n for n in os.listdir(folder) if n.endswith(".whl"))
    for name in names:
        dist, version = name.split("-")[:2]  # {dist}-{version}(-{build})?-{py}-{abi}-{plat}.whl
        found.setdefault(normalise(dist), []).append(version)
    problems = [f"{d}: {len(v)} wheels ({', '.join(v)})" for d, v in found.items() if len(v) > 1]
    problems += [f"{d}: not pinned in {os.path.basename(PINS)}" for d in found if d not in pins]
    problems += [
        f"{d}: {v[0]}, pinned {pins[d]}"
        for d, v in found.items()
        if d in pins and len(v) == 1 and v[0] != pins[d]
    ]
    problems += [f"{d}=={v}: no wheel" for d, v in pins.items() if d not in found]
    return problems


# ----------------------------------------------------------------------------- what travels


def travelling(root: str, carry: list[str]) -> dict[str, int]:
    """{path: bytes} of what a call sends: the tracked and untracked-not-ignored files of the
    tree, a shared/ folder in it, and every file under the carry paths (links as links)."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=root,
        capture_output=True,
        check=True,
    ).stdout.decode()
    paths = [p for p in listed.split("\0") if p]
    for top in ["shared", *carry]:
        paths += _files_under(root, top)
    sizes = {}
    for path in paths:
        full = os.path.join(root, path)
        if os.path.islink(full) or (os.path.exists(full) and not os.path.isdir(full)):
            sizes[os.path.normpath(path)] = os.lstat(full).st_size
    return sizes


def _files_under(root: str, top: str) -> list[str]:
    full = os.path.join(root, top)
    if not os.path.isdir(full) or os.path.islink(full):
        return [top] if os.path.lexists(full) else []
    out = []
    for d, dirs, files in os.walk(full):
        dirs[:] = [x for x in dirs if not os.path.islink(os.path.join(d, x))]
        links = [x for x in os.listdir(d) if os.path.islink(os.path.join(d, x))]
        out += [os.path.relpath(os.path.join(d, x), root) for x in {*files, *links}]
    return out


def size_report(root: str, carry: list[str]) -> tuple[int, list[str]]:
    """(total bytes, lines saying what travels and how much is left under the limit)."""
    sizes = travelling(root, carry)
    parts = {c: 0 for c in carry}
    tree = 0
    for path, size in sizes.items():
        top = next((c for c in carry if path == c or path.startswith(c.rstrip("/") + "/")), None)
        if top is None:
            tree += size
        else:
            parts[top] += size
    total = tree + sum(parts.values())
    lines = [f"  tree (tracked + untracked, not ignored): {tree:,} bytes"]
    lines += [f"  carry {c}: {s:,} bytes" for c, s in parts.items()]
    left = TRAVEL_LIMIT - total
    lines.append(f"  total {total:,} bytes = {total / 2**20:.2f} MiB; {left / 2**20:.2f} MiB left")
    return total, lines


# ----------------------------------------------------------------------------- the calls


def check_pack(path: str) -> list[str]:
    """What is wrong with the pack at `path` for call 1: missing, or not all of CIFAR-10."""
    meta = os.path.join(path, "simclr_pack.json")
    if not os.path.exists(meta):
        return [f"no {path} (docs/gpu.md: python -m simclr_jax.data.pack --tfds cifar10 ...)"]
    with open(meta) as f:
        splits = json.load(f)["splits"]
    want = {"train": TRAIN, "test": TEST}
    got = {s: splits.get(s, {}).get("num_examples") for s in want}
    return [] if got == want else [f"{path} holds {got}, not {want}"]


def call_line(call: str) -> str:
    """The device tool's call for `call` (the speed call's deadline from the session's left)."""
    carry = json.dumps(CARRY[call])
    if call == "recipe":
        command = "bash benchmarks/gpu_run.sh recipe"
        return f'run(command="{command}", carry={carry}, timeout_s={COMMAND_S})'
    return (
        f'run(command="DEADLINE_S=<budget_left_s - {HELD_BACK_S}> bash benchmarks/gpu_run.sh '
        f'speed", carry={carry}, timeout_s=<DEADLINE_S + 30, at most {COMMAND_S}>)'
    )


def check(call: str, root: str = ROOT) -> int:
    """Before a call: the wheels against the pins, the pack (call 1), the size of what travels;
    prints each and the call to make. 0 when everything is in order, else 1."""
    problems = []
    wheels = os.path.join(root, WHEELS)
    if os.path.isdir(wheels):
        problems += [f"wheels: {p}" for p in check_wheels(wheels, read_pins())]
    else:
        problems.append(f"wheels: no {WHEELS}/ (docs/gpu.md: pip download ... -d {WHEELS})")
    if call == "recipe":
        problems += [f"pack: {p}" for p in check_pack(os.path.join(root, PACK))]
    missing = [c for c in CARRY[call] if not os.path.exists(os.path.join(root, c))]
    total, lines = size_report(root, [c for c in CARRY[call] if c not in missing])
    print(f"what travels with the {call} call:")
    print("\n".join(lines))
    if total > TRAVEL_LIMIT:
        problems.append(f"size: {total:,} bytes is over the {TRAVEL_LIMIT:,} a call may carry")
    for p in problems:
        print(f"REFUSED {p}")
    if not problems:
        print(f"ok; the call: {call_line(call)}")
    return 1 if problems else 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="what", required=True)
    sub.add_parser("table", help="the budget tables (docs/gpu.md)")
    c = sub.add_parser("check", help="before a call: wheels, pack, size")
    c.add_argument("call", choices=tuple(CARRY))
    c.add_argument("--root", default=ROOT)
    w = sub.add_parser("wheels", help="check a wheel folder against the pins")
    w.add_argument("folder")
    args = p.parse_args(argv)
    if args.what == "table":
        print(table())
        return 0
    if args.what == "check":
        return check(args.call, args.root)
    problems = check_wheels(args.folder, read_pins())
    for line in problems:
        print(f"REFUSED {line}")
    print(f"wheels in {args.folder}: " + ("ok" if not problems else "refused"))
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
