"""``cellwatch synth``: simulate a pick-and-place cell recording in the voraus-AD layout, or (--images) write
an image data set in the MVTec AD layout from a real photographed texture with painted defects."""

from __future__ import annotations

import argparse
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from daemon.cli_support import UsageError, console, progress

if TYPE_CHECKING:
    from ingest.sim.presets import CellParams

#: flags of the recording only -> their default there (registered with default None: see run)
SIGNAL_ONLY: dict[str, Any] = {
    "--cycles": None,
    "--scale": None,
    "--rate": 100,
    "--categories": None,
    "--workers": None,
    "--pcap": None,
    "--bus-hz": 1000,
    "--pcap-copies": 2,
    "--preset": "default",
    "--param": (),
}
#: flags of --images only -> their default there
IMAGE_ONLY: dict[str, Any] = {
    "--category": "brick",
    "--size": 256,
    "--train": 60,
    "--test-good": 20,
    "--per-defect": 10,
    "--defects": None,  # all
}


def add_parser(sub: Any) -> None:
    from ingest.sim.presets import PRESET_NOTES, PRESETS, field_names  # no numpy: cheap

    p = sub.add_parser(
        "synth",
        help="simulate a cell recording (voraus-AD layout, all 12 anomaly categories), or an image data set",
        description=(
            "Simulate a 6-axis pick-and-place cell with rigid-body dynamics (pinocchio) and write it "
            "as a voraus-AD parquet file. By default the paper's size: 948 training normals, "
            "419 test normals, 755 anomalies. --preset makes another cell (another arm, program, sensors, "
            "warm-up or controller; --param changes single parameters), named in the file's metadata "
            "(key cellwatch.sim). With --images, write an MVTec-AD-layout folder instead: crops "
            "of a real texture photograph (shipped with scikit-image) as normal images, and test images with "
            "painted defects and their masks."
        ),
    )
    p.add_argument(
        "--out", required=True, type=Path, help="parquet file to write (--images: a new directory)"
    )
    p.add_argument("--seed", type=int, default=0, help="random seed; the same seed gives the same data")
    p.add_argument("--images", action="store_true", help="write an image data set (MVTec AD layout)")
    signals = p.add_argument_group("recording (default)")
    size = signals.add_mutually_exclusive_group()
    size.add_argument("--cycles", type=int, help="total number of cycles (paper proportions kept)")
    size.add_argument("--scale", type=float, help="fraction of the paper's counts, e.g. 0.05")
    signals.add_argument("--rate", type=int, choices=(100, 500), help="sampling rate in Hz (default 100)")
    signals.add_argument(
        "--categories",
        nargs="+",
        metavar="CAT",
        help="anomaly categories to include (names such as AXIS_FRICTION or numbers 0-11); default all",
    )
    signals.add_argument("--workers", type=int, help="worker processes (default: all cores)")
    notes = "; ".join(f"{name}: {PRESET_NOTES[name]}" for name in PRESETS).replace("%", "%%")
    signals.add_argument(
        "--preset",
        choices=list(PRESETS),
        help=f"the cell to simulate (default: default). {notes}",
    )
    signals.add_argument(
        "--param",
        action="append",
        metavar="KEY=VALUE",
        help="override one cell parameter of the preset, repeatable; tuples comma-separated, e.g. "
        "--param noise_level=2 --param place_xyz=0.1,0.45,0.07 (link_mass_scale takes 1 or 6 factors). "
        f"Keys: {', '.join(field_names())}",
    )
    signals.add_argument(
        "--pcap",
        type=Path,
        help="also write the same cycles as an EtherCAT capture (pcapng) of the bus between controller and "
        "drives, with its maps next to it (NAME.eni.xml, NAME.map.yaml, NAME.eni-map.yaml)",
    )
    signals.add_argument("--bus-hz", type=int, help="--pcap: the bus rate (default 1000 Hz)")
    signals.add_argument(
        "--pcap-copies",
        type=int,
        choices=(1, 2),
        help="--pcap: 2 (default) = captured at the master, each frame outgoing and returned; 1 = from a TAP "
        "behind the ring, the returned copy only",
    )
    images = p.add_argument_group("images (--images)")
    images.add_argument("--category", help="texture: brick, grass or gravel (default brick)")
    images.add_argument("--size", type=int, help="image size in pixels, square (default 256)")
    images.add_argument("--train", type=int, help="normal training images in train/good (default 60)")
    images.add_argument("--test-good", type=int, help="normal test images in test/good (default 20)")
    images.add_argument("--per-defect", type=int, help="test images per defect type (default 10)")
    images.add_argument(  # names checked by the generator: importing it here would slow every command
        "--defects",
        nargs="+",
        metavar="DEFECT",
        help="defect types (default all: scratch, hole, stain, missing, color_shift)",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from daemon.image_jobs import resolve_kind_flags

    resolve_kind_flags(
        args,
        images=args.images,
        signal_only=SIGNAL_ONLY,
        image_only=IMAGE_ONLY,
        context="not with --images" if args.images else "add --images to write an image data set",
    )
    return synth_images(args) if args.images else synth_recording(args)


def synth_images(args: argparse.Namespace) -> int:
    """An MVTec-layout folder; refuses a non-empty one (old files would silently join the new set)."""
    from ingest.sim.images import DEFECTS, write_image_dataset

    out = Path(args.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UsageError(f"{out} exists and is not an empty directory; choose a new one for --images")
    for flag, value in (
        ("--train", args.train),
        ("--test-good", args.test_good),
        ("--per-defect", args.per_defect),
    ):
        if value < 0:
            raise UsageError(f"{flag} must be >= 0, got {value}")
    if args.size < 32:
        raise UsageError(f"--size must be at least 32, got {args.size}")
    defects = tuple(args.defects) if args.defects else DEFECTS
    started = time.perf_counter()
    with console.status(f"writing {args.category} images at {args.size} px to {out}"):
        try:
            counts = write_image_dataset(
                out,
                seed=args.seed,
                n_train=args.train,
                n_test_good=args.test_good,
                n_per_defect=args.per_defect,
                size=args.size,
                category=args.category,
                defects=defects,
            )
        except ValueError as err:
            raise UsageError(str(err)) from err
    console.print(
        f"wrote [bold]{out}[/]: {sum(counts.values())} {args.category} images at {args.size} px "
        f"in {time.perf_counter() - started:.1f} s"
    )
    console.print(", ".join(f"{folder} {n}" for folder, n in counts.items()))
    return 0


def cell_params(preset: str, overrides: Sequence[str], rate_hz: int) -> CellParams:
    """The preset with --param overrides, checked: the poses are reachable and every can position
    the cell can make (the belt region and the invalid positions beyond it) has an IK solution."""
    from ingest.sim.cell import CellSimulator
    from ingest.sim.presets import PRESETS, with_overrides

    try:
        params = with_overrides(PRESETS[preset], overrides)
    except (TypeError, ValueError) as err:
        raise UsageError(f"--param: {err}") from err
    try:
        CellSimulator(rate_hz, params=params).check_reach()
    except ValueError as err:
        given = f"--preset {preset}" + "".join(f" --param {item}" for item in overrides)
        raise UsageError(f"{given}: {err}") from err
    return params


def synth_recording(args: argparse.Namespace) -> int:
    from ingest.sim.dataset import write_recording
    from ingest.sim.presets import PRESETS
    from ingest.sim.scenarios import parse_categories, plan_recording

    if args.scale is not None and not args.scale > 0:
        raise UsageError(f"--scale must be > 0, got {args.scale}")
    if args.workers is not None and args.workers < 1:
        raise UsageError(f"--workers must be at least 1, got {args.workers}")
    try:
        categories = parse_categories(args.categories)
        specs = plan_recording(
            scale=1.0 if args.scale is None else args.scale,
            cycles=args.cycles,
            categories=categories,
            seed=args.seed,
        )
    except ValueError as err:
        raise UsageError(str(err)) from err
    params = cell_params(args.preset, args.param, args.rate)
    changed = params.changes(PRESETS[args.preset])
    cell = args.preset + "".join(f" {k}={_value(v)}" for k, v in changed.items())
    started = time.perf_counter()
    with progress() as bar:
        task = bar.add_task(
            f"simulating {len(specs)} cycles of cell {cell} at {args.rate} Hz", total=len(specs)
        )
        rows = write_recording(
            args.out,
            specs,
            rate_hz=args.rate,
            seed=args.seed,
            workers=args.workers,
            on_cycle=lambda _spec: bar.advance(task),
            params=params,
            preset=args.preset,
        )
    elapsed = time.perf_counter() - started
    counts = Counter(s.category.name for s in specs)
    train = sum(1 for s in specs if s.variant.name == "PRE_A")
    console.print(
        f"wrote [bold]{args.out}[/]: {len(specs)} cycles ({train} train, {len(specs) - train} test), "
        f"{rows} rows, {args.rate} Hz, cell {cell}, in {elapsed:.1f} s"
    )
    console.print(", ".join(f"{name} {n}" for name, n in sorted(counts.items())))
    if args.pcap is not None:
        write_pcap(args, Path(args.out), len(specs))
    return 0


def _value(v: Any) -> str:
    return ",".join(f"{x:g}" for x in v) if isinstance(v, list | tuple) else f"{v:g}"


def write_pcap(args: argparse.Namespace, recording: Path, cycles: int) -> None:
    from ingest.sim.ethercat import write_capture

    if args.bus_hz < 1 or 1_000_000_000 % args.bus_hz or (args.bus_hz % args.rate):
        raise UsageError(
            f"--bus-hz must be a multiple of the rate ({args.rate} Hz) dividing 1 GHz, got {args.bus_hz}"
        )
    started = time.perf_counter()
    with progress() as bar:
        task = bar.add_task(f"writing the EtherCAT capture at {args.bus_hz} Hz", total=cycles)
        try:
            frames, n, eni, yml = write_capture(
                recording,
                args.pcap,
                bus_hz=args.bus_hz,
                both_copies=args.pcap_copies == 2,
                seed=args.seed,
                on_cycle=lambda done: bar.update(task, completed=done),
            )
        except (OSError, ValueError) as err:
            raise UsageError(f"--pcap {args.pcap}: {err}") from err
    size = Path(args.pcap).stat().st_size / 2**20
    console.print(
        f"wrote [bold]{args.pcap}[/]: {frames} frames of {n} cycles on a {args.bus_hz} Hz bus "
        f"({size:.0f} MiB) "
        f"in {time.perf_counter() - started:.1f} s; maps {eni.name}, {yml.name}, "
        f"{eni.name.removesuffix('.eni.xml')}.eni-map.yaml"
    )
