"""Each of two gloo ranks scores half of the HellaSwag examples; both must report the whole.
Usage: hellaswag_eval.py CHECKPOINT DATA_FILE OUT_DIR"""
import json
import sys

import checkpoint
import distributed
import hellaswag

ckpt, data_file, out_dir = sys.argv[1:4]
ctx = distributed.setup("cpu")
model, config = checkpoint.load_model(ckpt, "cpu")
examples = hellaswag.render_examples(hellaswag.load_examples(data_file))
result = hellaswag.evaluate(model, examples, "cpu", batch_examples=5, rank=ctx.rank, world_size=ctx.world_size,
                            model_config=config)
with open(f"{out_dir}/rank{ctx.rank}.json", "w") as f:  # a file per rank: two processes printing to one pipe interleave
    f.write(json.dumps(result))
distributed.close()  # as the trainer leaves: no gloo worker is left to abort the exit
