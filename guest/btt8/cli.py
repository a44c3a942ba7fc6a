"""The `btt8` command line: create, info, check, read, write, bench."""

from __future__ import annotations

import argparse
import json
import sys

from . import bench, core

EXIT_CORRUPT = 1
EXIT_ERROR = 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="btt8", description="BTT8 pools on persistent memory")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("create", help="format a pool file or device (e.g. /dev/dax0.0)")
    p.add_argument("path")
    p.add_argument("--bsize", type=int, required=True)
    p.add_argument("--pool-mib", type=int, default=0,
                   help="pool size for a new file; devices default to their whole size")
    p.add_argument("--mode", type=lambda s: int(s, 8), default=0o644)

    p = sub.add_parser("info", help="superblock and map counts (read-only)")
    p.add_argument("path")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("check", help="read-only consistency check; exit 0 ok, 1 corrupt")
    p.add_argument("path")

    p = sub.add_parser("read", help="copy one block to a file ('-' for stdout)")
    p.add_argument("path")
    p.add_argument("lba", type=int)
    p.add_argument("--out", required=True)

    p = sub.add_parser("write", help="write one block from a file of exactly bsize bytes")
    p.add_argument("path")
    p.add_argument("lba", type=int)
    p.add_argument("--in", dest="infile", required=True)

    b = sub.add_parser("bench", help="measurements").add_subparsers(dest="bench", required=True)
    p = b.add_parser("recovery", help="mean open (recovery scan) time over N close/open cycles")
    p.add_argument("path")
    p.add_argument("--bsize", type=int, required=True)
    p.add_argument("--pool-mib", type=int, default=64, help="size when the pool is created")
    p.add_argument("--loops", type=int, default=10)
    p.add_argument("--prewrite", type=int, default=0, metavar="N",
                   help="when creating the pool, first do N random writes (worst-case open)")
    p.add_argument("--threads", type=int, default=1, help="writer threads for --prewrite")
    p.add_argument("--seed", type=int, default=1, help="seed of the --prewrite LBAs")
    p.add_argument("--span", type=int, default=0, metavar="S",
                   help="--prewrite LBAs from 0..S-1 only (a workload's working set)")

    p = b.add_parser("starve", help="one reader and N writers on LBA 0")
    p.add_argument("path")
    p.add_argument("--bsize", type=int, required=True)
    p.add_argument("--pool-mib", type=int, default=64, help="size when the pool is created")
    p.add_argument("--seconds", type=float, default=5.0)
    p.add_argument("--writers", type=int, nargs="+", default=[1, 2, 4])

    p = b.add_parser("io", help="random block writes then reads, optionally vs libpmemblk")
    p.add_argument("--bsize", type=int, default=4096)
    p.add_argument("--pool-mib", type=int, default=256)
    p.add_argument("--ops", type=int, default=50000)
    p.add_argument("--compare", choices=["libpmemblk"])
    p.add_argument("--dir", default="/dev/shm", help="where the temporary pools live")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--read-buffer", choices=["memoryview", "bytearray"], default="memoryview",
                   help="what BTT8's read_into gets: a view of the buffer made once (as "
                        "libpmemblk gets its address once), or the bytearray itself")
    p.add_argument("--interleave", type=int, default=0, metavar="N",
                   help="with --compare: alternate slices of N ops between the libraries "
                        "(both pools open; a busy host's slow patches hit both alike)")
    p.add_argument("--first", choices=["btt8", "libpmemblk"], default="btt8",
                   help="with --compare: whose passes run first (with --fresh the first wrote "
                        "slower here: a series can alternate it)")
    p.add_argument("--fresh", action="store_true",
                   help="time fresh pools: no untimed write of every LBA first, so the write "
                        "pass pays a page fault per first-touched tmpfs page")
    p.add_argument("--json", action="store_true")

    p = b.add_parser("ops", help="cost per call vs libpmemblk, no page faults, warm LBA set "
                                 "(fastest of N alternating rounds)")
    p.add_argument("--bsize", type=int, default=4096)
    p.add_argument("--pool-mib", type=int, default=256)
    p.add_argument("--calls", type=int, default=2000, help="LBAs per timed pass")
    p.add_argument("--repeat", type=int, default=200, help="rounds; the fastest counts")
    p.add_argument("--dir", default="/dev/shm", help="where the temporary pools live")
    p.add_argument("--seed", type=int, default=1)
    return parser


def _info(path: str) -> dict[str, object]:
    info = core.check(path)
    del info["ok"]
    return info


def _run(args: argparse.Namespace) -> int:
    if args.command == "create":
        with core.create(args.path, args.bsize, args.pool_mib << 20, args.mode) as pool:
            print(f"created {args.path}: bsize {pool.bsize}, {pool.nblock} blocks")
    elif args.command == "info":
        info = _info(args.path)
        if args.json:
            print(json.dumps(info, indent=2))
        else:
            for key, value in info.items():
                print(f"{key:15} {value}")
    elif args.command == "check":
        info = core.check(args.path)
        print(f"{args.path}: ok: {info['nblocks']} blocks, every PBA used once, "
              f"{info['free_blocks']} free (nfree {info['nfree']})")
    elif args.command == "read":
        with core.open(args.path, readonly=True) as pool:  # reading needs no write access
            data = pool.read(args.lba)
        if args.out == "-":
            sys.stdout.buffer.write(data)
        else:
            with open(args.out, "wb") as f:
                f.write(data)
    elif args.command == "write":
        if args.infile == "-":
            data = sys.stdin.buffer.read()
        else:
            with open(args.infile, "rb") as f:
                data = f.read()
        with core.open(args.path) as pool:
            pool.write(args.lba, data)
    elif args.bench == "recovery":
        bench.recovery(args.path, args.bsize, args.pool_mib, args.loops, sys.stdout, sys.stderr,
                       args.prewrite, args.threads, args.seed, args.span)
    elif args.bench == "starve":
        bench.starve(args.path, args.bsize, args.pool_mib, args.seconds, args.writers,
                     sys.stdout, sys.stderr)
    elif args.bench == "ops":
        costs = bench.ops(args.bsize, args.pool_mib, args.calls, args.repeat, args.dir,
                          args.seed)
        print(json.dumps({**costs, "interpreter": bench.interpreter()}))
    else:
        results = bench.io(args.bsize, args.pool_mib, args.ops, args.compare, args.dir,
                           args.seed, args.read_buffer, args.interleave, args.first,
                           args.fresh)
        if "libpmemblk" in results:
            mine, theirs = results["btt8"], results["libpmemblk"]
            results["ratio"] = {
                "write": round(mine["write_ops_per_s"] / theirs["write_ops_per_s"], 3),
                "read": round(mine["read_ops_per_s"] / theirs["read_ops_per_s"], 3)}
        report: dict[str, object] = {**results, "interpreter": bench.interpreter()}
        if args.json:
            print(json.dumps(report))
        else:
            for name, row in report.items():
                print(name, " ".join(f"{k}={v}" for k, v in row.items()))  # type: ignore
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return _run(args)
    except core.CorruptionError as exc:
        print(f"btt8: {exc.filename}: corrupt: {exc.strerror}", file=sys.stderr)
        return EXIT_CORRUPT
    except OSError as exc:
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"btt8: {where}{exc.strerror or exc}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        return 130


