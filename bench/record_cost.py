"""CPU time of the per-image audit work after generation (maps, scores, flags: ``image_record.generation_record``).

    PYTHONPATH=. .venv/bin/python bench/record_cost.py              # this checkout
    PYTHONPATH=../old .venv/bin/python bench/record_cost.py         # another checkout, same interpreter

Generates each prompt of ``shapes-default`` with seed 0 under trace on one torch thread, then times
``generation_record`` three times on that trace (process CPU time, so a busy second core does not count) and
prints the mean per generation beside the generation's own CPU time, as one JSON line. Works with the signature
before audit profiles (relevance, thresholds, k) and after (profile), so two checkouts can be run alternately and
compared side by side.
"""

from __future__ import annotations

import inspect
import json
import time

import torch


def main() -> None:
    from auditor.concepts import extract_many
    from auditor.engine.models import load_model
    from auditor.resources import find_suite
    from auditor.suites import load_suite
    import auditor.image_record as R

    torch.set_num_threads(1)
    lm = load_model("shapes-v1", device="cpu")
    suite = load_suite(find_suite("shapes-default"))
    extracted = extract_many(suite.prompts, tokenizer=lm.pipe.tokenizer)
    with_profile = "profile" in inspect.signature(R.generation_record).parameters
    if with_profile:
        from auditor.profile import profile_for

        args = (profile_for(lm),)
    else:  # the code before audit profiles
        from auditor.engine.hrv import relevance_for
        from auditor.thresholds import load

        th = load()
        args = (relevance_for(lm.pipe), th, th.k)
    try:  # where the audit's traced generation lives now; older checkouts had it beside generation_record
        from auditor.tasks import generate_one
    except ImportError:
        generate_one = R.generate_one
    record = gen = 0.0
    for p, cs in zip(suite.prompts, extracted):
        t = time.process_time()
        extra = () if with_profile else (args[0],)
        image, tr = generate_one(lm.pipe, p.text, 0, suite.defaults.steps, suite.defaults.guidance, None, *extra)
        gen += time.process_time() - t
        t = time.process_time()
        for _ in range(3):
            R.generation_record(tr, cs, *args, image)
        record += (time.process_time() - t) / 3
    n = len(suite.prompts)
    print(json.dumps({"profile_code": with_profile, "generations": n, "record_cpu_s": round(record / n, 5),
                      "generate_cpu_s": round(gen / n, 4)}))


if __name__ == "__main__":
    main()
