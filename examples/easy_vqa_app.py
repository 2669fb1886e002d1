"""A small app: answer questions about easy-VQA test images with an exported vlsparse bundle.

    python examples/easy_vqa_app.py BUNDLE [--questions 300] [--show 6] [--seed 0]

BUNDLE is a directory written by `vlsparse export` (csr, onnx or onnx --sparse). The app asks a few
questions one at a time, as an interactive app would (answer, score, latency in ms), then all of
them in batches and prints the accuracy against easy-VQA's answers. ONNX bundles need only
vlsparse's runtime (onnxruntime, numpy, scipy, Pillow, tokenizers; no torch) and the easy-vqa
package for the images and questions.
"""

from __future__ import annotations

import argparse
import random
import time

import easy_vqa

import vlsparse


def main(argv: list[str] | None = None) -> float:
    """Run the app; returns the accuracy (fraction) on the sampled test questions."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("bundle", help="bundle directory written by `vlsparse export`")
    ap.add_argument("--questions", type=int, default=300, help="test questions to sample")
    ap.add_argument("--show", type=int, default=6, help="questions to ask one at a time and print")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    t0 = time.perf_counter()
    pipe = vlsparse.Pipeline.load(args.bundle)
    load_ms = (time.perf_counter() - t0) * 1e3
    ticket = pipe.bundle.ticket
    test_score = ticket.get("metrics", {}).get("test", {}).get("vqa_score")
    print(f"{args.bundle}: {pipe.kind} bundle, sparsity {ticket.get('sparsity', 0.0):.0%}"
          + (f", test VQA score {test_score:.1%} when trained" if test_score is not None else "")
          + f", loaded in {load_ms:.0f} ms")

    texts, truths, image_ids = easy_vqa.get_test_questions()
    paths = easy_vqa.get_test_image_paths()
    picked = random.Random(args.seed).sample(range(len(texts)), args.questions)

    for i in picked[:args.show]:
        t = time.perf_counter()
        (answer, score), (second, score2) = pipe(paths[image_ids[i]], texts[i], top_k=2)
        ms = (time.perf_counter() - t) * 1e3
        mark = "ok" if answer == truths[i] else f"WRONG, truth {truths[i]}"
        print(f"  image {image_ids[i]:4d}  {texts[i]:<42} {answer:<9} {score:.2f}  (then {second} {score2:.2f})"
              f"  {ms:5.1f} ms  {mark}")

    t = time.perf_counter()
    results = pipe([paths[image_ids[i]] for i in picked], [texts[i] for i in picked], top_k=1)
    ms = (time.perf_counter() - t) * 1e3
    accuracy = sum(res[0][0] == truths[i] for res, i in zip(results, picked)) / len(picked)
    print(f"accuracy on {len(picked)} test questions: {accuracy:.1%}; "
          f"{ms / len(picked):.2f} ms per question in batches of {pipe.batch_size}")
    return accuracy


if __name__ == "__main__":
    main()
