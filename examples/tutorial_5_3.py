"""The tutorial's §5.2-5.3 listing, corrected, running on this package's from-scratch modules.

Only the imports differ from the tutorial (they named transformers/diffusers); every other
change is a correction, marked `# FIX:` with the reason. Run:

    python examples/tutorial_5_3.py                                  # the small model the package ships
    python examples/tutorial_5_3.py --model path/to/stable-diffusion-v1-5 --prompt "..." --steps 50

`--model` takes a diffusers pipeline folder (model_index.json, unet/, vae/, text_encoder/,
tokenizer/, scheduler/). Without it the script uses the package's own model folder, which
has the same layout.
"""
import argparse
from pathlib import Path

import torch  # FIX: the listing used torch without importing it
from PIL import Image
from tqdm.auto import tqdm

# Changed imports: the tutorial imported these names from transformers and diffusers.
from parti_from_scratch import (AutoencoderKL, CLIPTextModel, CLIPTokenizer, PNDMScheduler,
                                UNet2DConditionModel)
from parti_from_scratch.pipeline import DEFAULT_MODEL_DIR
from parti_from_scratch.sampling_defaults import SamplingDefaults

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--model", default=None, help="a diffusers pipeline folder (default: the shipped model)")
parser.add_argument("--prompt", default="a large red circle on the left")
parser.add_argument("--steps", type=int, default=None, help="sampler steps (default: the model folder's own)")
parser.add_argument("--guidance", type=float, default=None, help="guidance scale (default: the model folder's own)")
parser.add_argument("--seed", type=int, default=0)
parser.add_argument("-o", "--output", default="tutorial_5_3.png")
args = parser.parse_args()

# FIX: the tutorial's model id "google/parti-1b-distilled" does not exist, and Parti is not a diffusion
# model; the four components below are Stable Diffusion's. Any SD 1.x/2.x folder works here.
model_path = Path(args.model) if args.model else DEFAULT_MODEL_DIR
if not (model_path / "model_index.json").is_file():
    raise SystemExit(f"{model_path}: not a diffusers pipeline folder (no model_index.json)")
device = "cuda" if torch.cuda.is_available() else "cpu"  # FIX: `device` was never defined
# the steps and guidance scale the model folder recommends (sampling_defaults.json; 50 and 7.5 without one)
defaults = SamplingDefaults.read(model_path)
steps = args.steps if args.steps is not None else defaults.num_inference_steps
guidance = args.guidance if args.guidance is not None else defaults.guidance_scale

# §5.2: load the four components
vae = AutoencoderKL.from_pretrained(model_path, subfolder="vae").to(device)
tokenizer = CLIPTokenizer.from_pretrained(model_path, subfolder="tokenizer")
text_encoder = CLIPTextModel.from_pretrained(model_path, subfolder="text_encoder").to(device)
unet = UNet2DConditionModel.from_pretrained(model_path, subfolder="unet").to(device)
# FIX: read the sampler's settings from the model folder rather than retyping them: the tutorial's
# PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000)
# is SD 1.x's schedule, but a model trained with another one (v-prediction SD 2.x, this package's model)
# needs its own.
scheduler = PNDMScheduler.from_pretrained(model_path, subfolder="scheduler")

# §5.3: text -> image
prompt = [args.prompt]
# FIX: `height` and `width` were never defined; the UNet's sample size times the VAE's downsampling factor
vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)
height = width = unet.config.sample_size * vae_scale_factor
generator = torch.Generator().manual_seed(args.seed)

text_input = tokenizer(prompt, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                       return_tensors="pt")
with torch.no_grad():
    text_embeddings = text_encoder(text_input.input_ids.to(device))[0]
    # FIX: classifier-free guidance. The listing conditioned on the prompt only, which gives washed-out,
    # off-prompt images. Encode the empty prompt too and extrapolate away from it (see pipeline.py).
    uncond_input = tokenizer([""] * len(prompt), padding="max_length", max_length=tokenizer.model_max_length,
                             return_tensors="pt")
    uncond_embeddings = text_encoder(uncond_input.input_ids.to(device))[0]
text_embeddings = torch.cat([uncond_embeddings, text_embeddings])

latents = torch.randn((len(prompt), unet.config.in_channels, height // vae_scale_factor, width // vae_scale_factor),
                      generator=generator).to(device)
scheduler.set_timesteps(steps)  # FIX: the listing never set the number of inference steps
latents = latents * scheduler.init_noise_sigma

for t in tqdm(scheduler.timesteps):
    latent_model_input = torch.cat([latents] * 2)  # FIX (guidance): one batch, unconditional + conditional
    latent_model_input = scheduler.scale_model_input(latent_model_input, t)
    with torch.no_grad():
        noise_pred = unet(latent_model_input, t, encoder_hidden_states=text_embeddings).sample
    noise_pred_uncond, noise_pred_text = noise_pred.chunk(2)
    noise_pred = noise_pred_uncond + guidance * (noise_pred_text - noise_pred_uncond)
    latents = scheduler.step(noise_pred, t, latents).prev_sample

# FIX: divide by the VAE's own scaling factor (0.18215 for SD 1.x) instead of a hard-coded constant
latents = latents / vae.config.scaling_factor
with torch.no_grad():
    image = vae.decode(latents).sample

image = (image / 2 + 0.5).clamp(0, 1)
image = image.detach().cpu().permute(0, 2, 3, 1).numpy()
Image.fromarray((image[0] * 255).round().astype("uint8")).save(args.output)
print(args.output)
