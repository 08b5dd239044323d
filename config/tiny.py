# The offline CPU demo: the same pipeline as config/vpred.py on a tiny SDXL-topology model.
# Everything it needs is made on the first run when missing: a synthetic captioned dataset (PNG + .txt),
# a tiny BPE vocabulary learned from those captions, and a tiny random start checkpoint in the sgm layout.
#   python train.py config/tiny.py                       # ~seconds per step on 2 CPU cores
#   python train.py config/tiny.py --init_from=resume --max_iters=80
out_dir = "out/tiny"
init_from = "data/tiny/start.safetensors"  # made here when missing (tiny_size)
tiny_size = True
tokenizer = "data/tiny/tokenizer"  # vocab.json + merges.txt, learned from the synthetic captions
dataset_dir = "data/tiny/images"
make_synthetic = 96  # images written to dataset_dir when it is missing
resolution = 128  # buckets of area <= 128^2 with sides multiples of 32: 96x160, 128x128, 160x96
bucket_step = 32  # latents of 12..20 pixels: divisible by 4, as the 3-level UNet needs
synthetic_sizes = ((128, 128), (96, 160), (160, 96), (112, 176))
eval_items = 8
# global batch 4 = 4 micro x 1 accum x 1 process
batch_size = 4
grad_accum = 1
max_iters = 40
ramp_iters = 200  # betas ramp over 200 steps, independent of max_iters so split runs equal straight ones
lr = 3e-4  # a tiny net trained from scratch needs a larger lr than the uptrain's < 1e-5
min_lr = 3e-5
warmup_iters = 5
device = "cpu"
dtype = "float32"
compile = False
log_interval = 5
eval_interval = 20
ckpt_interval = 20
sample_interval = 0
sample_prompts = ("a red circle on a blue background", "a green square on a white background")
sample_steps = 10
export_dtype = "fp32"
