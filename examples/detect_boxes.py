"""Boxes of the phrases you give on a photograph (scikit-image's cat), from a local OWL-ViT / OWLv2 model folder.

Run:     python examples/detect_boxes.py <model folder> "a cat" "a dog"
         (the folder: e.g. google/owlvit-base-patch32 saved with save_pretrained, or downloaded with
         `huggingface-cli download google/owlvit-base-patch32 --local-dir <folder>`)
Prints:  one line per kept box, best first: "0.71  a cat  [0.03, 0.05, 0.93, 0.99]" (normalised x0, y0, x1, y1),
         then the record as the JSON that `ctrlkit extract condition=detected_boxes` writes.
"""

import json
import sys

from skimage import data

from conditions import DetectedBoxesExtractor

if len(sys.argv) < 3:
    raise SystemExit(__doc__.split("Prints:")[0])
extractor = DetectedBoxesExtractor(sys.argv[1], phrases=sys.argv[2:], threshold=0.1)
record = extractor(data.chelsea())
for score, phrase, box in zip(record.scores, record.phrases, record.boxes):
    print(f"{score:.2f}  {phrase}  {[round(float(v), 2) for v in box]}")
print(json.dumps(record.to_json()))
