"""How good and how costly the explanations are: one benchmark, one mode per question.

    python benchmarks/explanations.py MODE [options]      (MODE --help for each)

  frontier        each explanation option we ship: cost ÷ answer and peak memory at 224 px, pointing game
                  (masks), deletion / insertion / ROAD (no masks), on one table. Target: the default
                  ≤ 3x the answer and ≤ 4 GB at batch 16; the demo's option pointing ≥ 0.80
  faithfulness    pointing game and energy in the mask of a bundle's served maps, per class and member,
                  beside maps that know less (centre, flat, colour contrast, untrained). Target ≥ 0.80
  search          every combination of explanation layers and methods scored on val, the winner read on test
  distractors     the same images with ink blots and gel bubbles away from the lesion: does the map follow
                  the model or what stands out?
  lesion-removed  the lesion painted out: what the members still see in the skin
  border          whether maps peaking at the image border reflect the decision (painting the border over)
  sweep           (GPU) train and score the demo recipe at several sizes and strides

The modes that read synthetic lesions take --bundle, --data, --synth and --split (the demo's by default).
"""
from __future__ import annotations

import sys

import _harness  # noqa: F401  (the repository on sys.path)
from explain import border, distractors, faithfulness, frontier, lesion_removed, search, sweep

MODES = {"frontier": frontier.main, "faithfulness": faithfulness.main, "search": search.main,
         "distractors": distractors.main, "lesion-removed": lesion_removed.main, "border": border.main,
         "sweep": sweep.main}


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in MODES:
        print(__doc__ if not argv or argv[0] in ("-h", "--help") else
              f"explanations.py: unknown mode {argv[0]!r}; one of {', '.join(MODES)}", file=sys.stderr)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    MODES[argv[0]](argv[1:])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
