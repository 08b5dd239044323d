# The recipe (docs/maths.md §1): SDXL base 1.0 (0.9 VAE), eps -> v, 1000 steps of AdamW8bit at batch 4.
#   python train.py config/vpred.py --k=5 --dataset_dir=/path/to/images
#   torchrun --standalone --nproc_per_node=4 train.py config/vpred.py --dataset_dir=... --batch_size=1
out_dir = "out/vpred"
init_from = "hf:stabilityai/stable-diffusion-xl-base-1.0/sd_xl_base_1.0_0.9vae.safetensors"
tokenizer = "hf:stabilityai/stable-diffusion-xl-base-1.0"
resolution = 1024  # buckets of area <= 1024^2, sides multiples of 64
# global batch 4 = 4 micro x 1 accum x 1 GPU; on 4 GPUs use --batch_size=1 (1 x 1 x 4 = 4)
batch_size = 4
grad_accum = 1
max_iters = 1000  # 1000 x 4 = 4000 images seen
ramp_iters = 1000  # betas (0.9, 0.95) -> (0.95, 0.99) linearly over the whole run
prediction = "v"
beta_end = 0.024  # 0.012 * sqrt(1024 / 256), the recipe's resolution-scaled schedule
zsnr = True
weighting = "sigmoid"
k = 5.0  # sigmoid(5 - logSNR): > 0.5 from t=7, 0.99 by t=249 (docs/maths.md §4)
optimizer = "adamw8bit"
lr = 7.5e-6  # strictly below 1e-5, as the recipe
warmup_iters = 50
lr_schedule = "constant"
precision = "amp"  # fp32 master weights (10.3 GB) + bf16 autocast; pure bf16 loses most updates at this lr
dtype = "bfloat16"
compile = True
log_interval = 10
eval_interval = 100
sample_interval = 250
ckpt_interval = 250
export_dtype = "fp16"
