"""`metalab serve`'s writes: seconds to add one example to a task whose support set holds
``--support`` images, with the service's decoded examples kept between writes and without
(every write decoding its whole support set again, as before they were kept).

A write re-adapts the task to its whole support set; this measures that path in process (no
HTTP), on the ProtoNet over the embedded glyphs that ``serve_load.py`` serves. Two services
on two stores hold the same task (``--support`` glyph images, 20 per class); each timed call
adds the same new image to both, interleaved (A B, B A, ...), medians over ``--repeats``
rounds. Predictions after the run must agree between the two.

    python benchmarks/serve_writes.py [--support 1600] [--repeats 5] [--steps 4] [--quick]
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import harness
from metalab.data import glyphs
from metalab.serve.service import Service

FULL = {"support": 1600, "repeats": 5, "steps": 4}
QUICK = {"support": 100, "repeats": 1, "steps": 2}
PER_CLASS = 20  # images per class in the support set (the glyph data set has 20 per class)
WARMUP_WRITES = 1


def main() -> None:
    args = harness.Options(__doc__, "serve_writes", FULL, QUICK).parse()
    checkpoint = harness.trained_checkpoint(
        "serve/glyphs-protonet", "quick/default", "algorithm=protonet", "steps=200",
        "val_every=100", "test_episodes=100")
    data = glyphs.load("test").data
    classes = args.support // PER_CLASS
    timed = args.repeats * args.steps
    extra = timed + WARMUP_WRITES
    if classes + extra > len(data):
        raise SystemExit(f"--support {args.support} and {extra} writes need "
                         f"{classes + extra} glyph classes; the test split has {len(data)}.")
    support = {f"g{c}": [harness.png(data[c, i]) for i in range(PER_CLASS)]
               for c in range(classes)}
    # each write brings a drawing of a glyph the task has not seen, to its first class
    new = [harness.png(data[classes + i, 0]) for i in range(extra)]
    with tempfile.TemporaryDirectory() as folder:
        services = {"kept": Service(checkpoint, Path(folder) / "kept.sqlite"),
                    "decoded every write": Service(checkpoint, Path(folder) / "every.sqlite")}
        services["decoded every write"].decoded_kept = 0
        for service in services.values():
            service.create_task("t")
            for name, images in support.items():
                service.add_class("t", name, [(i, "image/png") for i in images])

        def write(service: Service):
            def call(index: int) -> None:  # warm-up indices start at harness.WARMUP
                image = new[index] if index < timed else new[timed + index - harness.WARMUP]
                service.add_examples("t", "g0", [(image, "image/png")])
            return call

        times = harness.interleave({name: write(s) for name, s in services.items()},
                                   args.repeats, args.steps, warmup=WARMUP_WRITES)
        queries = [(harness.png(data[c, 0]), "image/png") for c in range(classes)]
        same = [s.predict("t", queries) for s in services.values()]
        for service in services.values():
            service.store.close()
    summary = harness.summarise(times, "decoded every write")
    if same[0] != same[1]:
        raise SystemExit("the two services predict differently: keeping decoded examples "
                         "changed what the model sees.")
    for name, row in summary.items():
        print(f"{args.support + 1}-image support, one write, {name}: {1e3 * row['s']:.1f} ms "
              f"(x{row['ratio']:.2f} of decoding every write; spread {row['spread']:.2f})")
    harness.write_json(args.out, "serve_writes", {"support": args.support,
                                                  "repeats": args.repeats,
                                                  "steps": args.steps, "rows": summary})


if __name__ == "__main__":
    main()
