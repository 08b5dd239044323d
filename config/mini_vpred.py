# The miniature reproduction, step 2 of 2: uptrain the eps model of config/mini_eps.py to v-prediction with the
# recipe (docs/maths.md §1): beta_end 0.024 + zero terminal SNR, sigmoid-k weighting with k=5, AdamW8bit,
# betas ramped (0.9, 0.95) -> (0.95, 0.99). Only the lr and the length are scaled to the small net. Run by
#   python mini_repro.py
# which calls  python train.py config/mini_vpred.py --out_dir=... after mini_eps (paths are mini_repro's defaults).
out_dir = "out/mini/vpred"
init_from = "out/mini/eps/model.safetensors"  # the epsilon export: VAE, text encoders and UNet
tokenizer = "out/mini/tokenizer"
dataset_dir = "out/mini/images"
cache_dir = "out/mini/cache"  # the eps run's cache: same VAE and text encoders
make_synthetic = 0
resolution = 64
bucket_step = 32
eval_items = 16  # the same held-out images as the pretrain
# global batch 16 = 16 micro x 1 accum x 1 process
batch_size = 16
grad_accum = 1
max_iters = 300  # 300 x 16 = 4800 images seen, half the pretrain
prediction = "v"
beta_end = 0.024  # 0.012 * sqrt(1024 / 256), the recipe's resolution-scaled schedule, kept as is
zsnr = True
weighting = "sigmoid"
k = 5.0  # sigmoid(5 - logSNR): only the first ~50 low-noise steps are down-weighted (docs/maths.md §4)
optimizer = "adamw8bit"
lr = 3e-4  # the recipe's < 1e-5 is for 2.6B parameters at the end of a long pretrain; a 10M net moves at ~1e-4
lr_schedule = "constant"
warmup_iters = 10
ramp_iters = 300  # betas (0.9, 0.95) -> (0.95, 0.99) linearly over the whole run, as the recipe
beta1 = 0.9
beta2 = 0.95
beta1_final = 0.95
beta2_final = 0.99
weight_decay = 0.01
caption_dropout = 0.1
device = "cpu"
dtype = "float32"
compile = False
log_interval = 25
eval_interval = 20  # 15 points of the held-out v-MSE per t-bin: the uptrain-progress curve (docs/maths.md §6)
ckpt_interval = 0
sample_interval = 0
export_dtype = "fp32"
