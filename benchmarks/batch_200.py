"""200 batch items, 10 of them bad, in one run: 190 images and 10 failure records (issue 16).

CPU, tiny SDXL, 1 step at 16x16; prints the counts and seconds as JSON.
    PYTHONPATH=src python benchmarks/batch_200.py [OUT_DIR]
"""

import json
import sys
import tempfile
import time
from pathlib import Path

from autofit import autofit
from autofit.batch.runner import iter_manifest, run_batch
from autofit.testing import tiny_sdxl

BAD = [{"height": 7}, {"height": 60}, {"seed": 2**64}, {"seed": 1e30}, {"negative_prompt": 5},
       {"num_inference_steps": "abc"}, {"steps": 3}, {"guidence_scale": 5.0}, {"width": -64}, {"prompt": ""}]


def main() -> None:
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(tempfile.mkdtemp(prefix="autofit-batch200-"))
    rows = []
    for i in range(200):
        row = {"id": f"p{i:03d}", "prompt": f"a photo of a cat {i}"}
        if i % 20 == 7:
            row.update(BAD[i // 20])
        rows.append(json.dumps(row))
    prompts = out / "prompts.jsonl"
    out.mkdir(parents=True, exist_ok=True)
    prompts.write_text("\n".join(rows))
    pipe = tiny_sdxl()
    pipe.set_progress_bar_config(disable=True)
    t = time.perf_counter()
    report = run_batch(autofit(pipe, cache=False), prompts, out / "images",
                       defaults={"height": 16, "width": 16, "num_inference_steps": 1}, progress=False)
    records = list(iter_manifest(out / "images"))
    result = {"images": len(list((out / "images").glob("*.png"))), "done": len(report.done),
              "failed_records": sum(r["status"] == "failed" for r in records), "seconds": round(time.perf_counter() - t, 1)}
    print(json.dumps(result))
    assert result["images"] == 190 and result["failed_records"] == 10


if __name__ == "__main__":
    main()
