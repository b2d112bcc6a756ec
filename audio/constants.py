"""Audio facts the whole project shares, each with its unit (after openai/whisper's audio.py).

The model hears 16 kHz mono and its vocoder speaks 24 kHz mono, one codec frame every 80 ms.
These rates are fixed by Qwen3-Omni's audio encoder and code2wav; the config file repeats them
for users of the earlier web version, but code should take them from here.
"""

SAMPLE_RATE = 16_000  # Hz: what the audio encoder hears
OUTPUT_SAMPLE_RATE = 24_000  # Hz: what code2wav produces
FRAME_HZ = 12.5  # codec frames per second (80 ms each)
FRAME_MS = 1000.0 / FRAME_HZ  # 80 ms per codec frame
SAMPLES_PER_FRAME_IN = int(SAMPLE_RATE / FRAME_HZ)  # 1280 samples at 16 kHz per frame
SAMPLES_PER_FRAME_OUT = int(OUTPUT_SAMPLE_RATE / FRAME_HZ)  # 1920 samples at 24 kHz per frame

# Whisper-style log-mel features of the audio encoder.
N_FFT = 400  # samples per STFT window (25 ms at 16 kHz)
HOP_LENGTH = 160  # samples between mel frames (10 ms at 16 kHz)
N_MELS = 128  # mel bins
MEL_FRAMES_PER_SECOND = SAMPLE_RATE // HOP_LENGTH  # 100 mel frames per second

# Silero VAD takes exactly this window at 16 kHz.
VAD_WINDOW_SAMPLES = 512  # samples per VAD window
VAD_WINDOW_MS = 1000.0 * VAD_WINDOW_SAMPLES / SAMPLE_RATE  # 32 ms

# Reading files: block size of the streaming reader.
DEFAULT_BLOCK_S = 30.0  # seconds of 16 kHz audio per block yielded by iter_audio_blocks

assert SAMPLES_PER_FRAME_IN * FRAME_HZ == SAMPLE_RATE
assert SAMPLES_PER_FRAME_OUT * FRAME_HZ == OUTPUT_SAMPLE_RATE


def samples_to_seconds(n_samples: int, rate: int = SAMPLE_RATE) -> float:
    """Duration in seconds of `n_samples` at `rate` Hz."""
    return n_samples / rate


def frames_to_samples(frames: int) -> int:
    """Samples at 16 kHz in `frames` codec frames (80 ms each): 4 frames, 320 ms, are 5120."""
    return frames * SAMPLES_PER_FRAME_IN


def ms_to_samples(ms: float, rate: int = SAMPLE_RATE) -> int:
    """Number of samples at `rate` Hz in `ms` milliseconds (rounded to the nearest sample)."""
    return int(round(ms * rate / 1000.0))
