# The miniature reproduction, step 1 of 2: pretrain a small SDXL-topology UNet with EPSILON prediction on the
# pretrain schedule (beta_end 0.012, no zsnr), the stand-in for "SDXL base" (docs/maths.md §1). Run by
#   python mini_repro.py                     # makes the data, VAE, vocabulary and start checkpoint first
# which calls  python train.py config/mini_eps.py --out_dir=... (paths below are mini_repro.py's defaults).
out_dir = "out/mini/eps"
init_from = "out/mini/start.safetensors"  # trained VAE, random frozen text encoders, random UNet (mini_repro)
tokenizer = "out/mini/tokenizer"  # BPE vocabulary learned from the synthetic captions (mini_repro)
dataset_dir = "out/mini/images"  # synthetic 64x64 shapes, written by mini_repro
cache_dir = "out/mini/cache"  # shared with mini_vpred: same VAE and text encoders, so the same cache keys
make_synthetic = 0  # the dataset must already exist (mini_repro makes it with its own size and count)
resolution = 64  # one bucket, 64x64 -> 16x16 latents through the 4x VAE (divisible by 4, as a 3-level UNet needs)
bucket_step = 32
eval_items = 16  # the first 16 images by path: never trained on, also held out of the VAE and the ablation table
# global batch 16 = 16 micro x 1 accum x 1 process
batch_size = 16
grad_accum = 1
max_iters = 600  # 600 x 16 = 9600 images seen (~30 epochs of 304 training images)
prediction = "eps"
beta_end = 0.012  # the pretrain schedule
zsnr = False  # an eps model cannot use zero terminal SNR (x0 = (z - sigma eps) / alpha, alpha = 0)
weighting = "none"  # plain eps-MSE, as SD/SDXL were pretrained
optimizer = "adamw"
lr = 1e-3  # a small net from scratch: ~100x the uptrain lr of a real SDXL
min_lr = 1e-4
lr_schedule = "cosine"
warmup_iters = 30
ramp_iters = 600  # cosine decays to min_lr at the end of the run
beta1 = 0.9  # no betas ramp in pretraining: constant (0.9, 0.99)
beta2 = 0.99
beta1_final = 0.9
beta2_final = 0.99
weight_decay = 0.0
caption_dropout = 0.1  # the unconditional branch for CFG at sampling time
device = "cpu"
dtype = "float32"
compile = False
log_interval = 25
eval_interval = 100
ckpt_interval = 0  # ckpt.pt only at the end
sample_interval = 0
export_dtype = "fp32"  # the uptrain starts from this export; fp32 so nothing is lost in between
