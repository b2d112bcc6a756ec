"""The `duplex-chat` command line: parses flags into settings and hands off to one module per command.

This is the edge where `DuplexError` becomes one clean line on stderr and a non-zero exit code.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Optional

import typer

from duplex_chat.config import DuplexError, Settings, load_settings

app = typer.Typer(
    name="duplex-chat",
    help="Full-duplex voice chat with Qwen3-Omni on your own NVIDIA GPU.",
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)

# Typer options shared by every command that loads the model. Each maps to one config key.
ConfigOpt = typer.Option(None, "--config", help="A TOML file laid out like config/default.toml.")
ModelOpt = typer.Option(None, "--model", help="Hub id or local checkpoint directory \\[qwen.model_id].")
DtypeOpt = typer.Option(None, "--dtype", help="float16, bfloat16, float32 or auto \\[qwen.torch_dtype].")
DeviceMapOpt = typer.Option(None, "--device-map", help="cuda, cuda:N, cpu or auto \\[qwen.device_map].")
Int8Opt = typer.Option(None, "--load-in-8bit/--no-load-in-8bit", help="8-bit weights \\[qwen.load_in_8bit].")
QuantizeOpt = typer.Option(None, "--quantize",
                           help="none, int8, int4 or fp8: round the weights while loading \\[qwen.quantize].")
VoiceOpt = typer.Option(None, "--voice", help="Ethan, Chelsie or Aiden \\[qwen.voice].")
SystemOpt = typer.Option(None, "--system-prompt", help="The assistant's instructions \\[qwen.system_prompt].")
GreedyOpt = typer.Option(None, "--greedy/--sample", help="Deterministic decoding \\[qwen.greedy].")
JsonOpt = typer.Option(False, "--json", help="One JSON object per line instead of the terminal view.")


# Config keys whose flag is not simply --<key>, so messages name what the user typed.
FLAG_NAMES = {
    "qwen.model_id": "--model",
    "qwen.torch_dtype": "--dtype",
    "audio.echo_cancellation": "--headphones",
    "audio.barge_in": "--no-barge-in",
    "ui.record_dir": "--record",
}


def settings_from(config: Optional[Path], **flags: Any) -> Settings:
    """Settings from all layers; `flags` maps "section.key" to a flag's value (None = not given)."""
    given = {k: v for k, v in flags.items() if v is not None}
    return load_settings(config_file=config, overrides=given, flag_names=FLAG_NAMES)


def model_flags(model, dtype, device_map, int8, quantize, voice=None, system_prompt=None,
                greedy=None) -> dict:
    return {
        "qwen.model_id": model,
        "qwen.torch_dtype": dtype,
        "qwen.device_map": device_map,
        "qwen.load_in_8bit": int8,
        "qwen.quantize": quantize,
        "qwen.voice": voice,
        "qwen.system_prompt": system_prompt,
        "qwen.greedy": greedy,
    }


@app.command()
def check(
    config: Optional[Path] = ConfigOpt,
    model: Optional[str] = ModelOpt,
    dtype: Optional[str] = DtypeOpt,
    device_map: Optional[str] = DeviceMapOpt,
    load_in_8bit: Optional[bool] = Int8Opt,
    quantize: Optional[str] = QuantizeOpt,
    json_out: bool = JsonOpt,
) -> None:
    """Can this machine run duplex-chat? Lists what is ready and what to fix."""
    from .check import run_check

    settings = settings_from(config, **model_flags(model, dtype, device_map, load_in_8bit, quantize))
    raise typer.Exit(run_check(settings, json_out=json_out))


@app.command()
def replay(
    file: Path = typer.Argument(..., help="A recorded conversation (wav, flac or ogg)."),
    out: Optional[Path] = typer.Option(None, "--out", help="Write a stereo wav: input left, reply right."),
    config: Optional[Path] = ConfigOpt,
    model: Optional[str] = ModelOpt,
    dtype: Optional[str] = DtypeOpt,
    device_map: Optional[str] = DeviceMapOpt,
    load_in_8bit: Optional[bool] = Int8Opt,
    quantize: Optional[str] = QuantizeOpt,
    voice: Optional[str] = VoiceOpt,
    system_prompt: Optional[str] = SystemOpt,
    greedy: Optional[bool] = GreedyOpt,
    stock: bool = typer.Option(False, "--stock", help="Use stock generate() instead of the engine."),
    json_out: bool = JsonOpt,
    measured_latency: bool = typer.Option(
        False, "--measured-latency",
        help="Start each reply after its first packet's compute time measured here, not the "
             "modelled 80 ms (results then vary with this machine and its load)."),
) -> None:
    """Play a recorded conversation in as if spoken; print, time and save the replies."""
    from .replay import run_replay

    flags = model_flags(model, dtype, device_map, load_in_8bit, quantize, voice, system_prompt,
                        greedy)
    settings = settings_from(config, **flags)
    raise typer.Exit(run_replay(settings, file, out=out, stock=stock, json_out=json_out,
                                measured_latency=measured_latency))


@app.command()
def talk(
    config: Optional[Path] = ConfigOpt,
    model: Optional[str] = ModelOpt,
    dtype: Optional[str] = DtypeOpt,
    device_map: Optional[str] = DeviceMapOpt,
    load_in_8bit: Optional[bool] = Int8Opt,
    quantize: Optional[str] = QuantizeOpt,
    voice: Optional[str] = VoiceOpt,
    system_prompt: Optional[str] = SystemOpt,
    greedy: Optional[bool] = GreedyOpt,
    input_device: Optional[str] = typer.Option(None, "--input-device", help="Index or name part."),
    output_device: Optional[str] = typer.Option(None, "--output-device", help="Index or name part."),
    list_devices: bool = typer.Option(False, "--list-devices", help="Show audio devices and exit."),
    headphones: bool = typer.Option(False, "--headphones", help="No echo cancellation needed."),
    no_barge_in: bool = typer.Option(False, "--no-barge-in", help="Never interrupt the reply."),
    record: Optional[Path] = typer.Option(None, "--record", help="Save audio and events to DIR."),
    plain: Optional[bool] = typer.Option(None, "--plain/--live", help="Line output \\[ui.plain]."),
) -> None:
    """Talk with the model through your microphone and speaker."""
    from .talk import run_talk

    flags = model_flags(model, dtype, device_map, load_in_8bit, quantize, voice, system_prompt,
                        greedy)
    flags.update({
        "audio.input_device": input_device,
        "audio.output_device": output_device,
        "audio.echo_cancellation": False if headphones else None,
        "audio.barge_in": False if no_barge_in else None,
        "ui.record_dir": str(record) if record is not None else None,
        "ui.plain": plain,
    })
    settings = settings_from(config, **flags)
    raise typer.Exit(run_talk(settings, list_devices_only=list_devices))


@app.command()
def bench(
    config: Optional[Path] = ConfigOpt,
    model: Optional[str] = ModelOpt,
    dtype: Optional[str] = DtypeOpt,
    device_map: Optional[str] = DeviceMapOpt,
    quantize: Optional[str] = QuantizeOpt,
    random_weights: bool = typer.Option(False, "--random-weights",
                                        help="Full-size model from the release config, random weights."),
    turns: int = typer.Option(8, "--turns", min=1,
                              help="Measured turns, after 2 warm-up (8: a 10-turn conversation)."),
    user_seconds: float = typer.Option(10.0, "--user-seconds", min=1.0, help="User audio per turn."),
    reply_seconds: float = typer.Option(10.0, "--reply-seconds", min=0.5, help="Reply audio per turn."),
    no_baseline: bool = typer.Option(False, "--no-baseline", help="Skip the stock generate() run."),
    verify: bool = typer.Option(False, "--verify", help="Check fast vs eager path agreement."),
    memory_limit_gib: Optional[float] = typer.Option(
        None, "--memory-limit-gib", min=1.0,
        help="Let torch allocate at most this much, as on a smaller card (23 for a 24 GB one)."),
    layout: Optional[str] = typer.Option(
        None, "--layout", help="With --random-weights: a published checkpoint's quantization "
        "(community-awq: int4 groups of 32, talker bf16)."),
    json_out: bool = JsonOpt,
) -> None:
    """Measure the engine on this GPU against the targets (and stock generate())."""
    from .bench import run_bench

    settings = settings_from(config, **model_flags(model, dtype, device_map, None, quantize))
    raise typer.Exit(run_bench(settings, random_weights, turns, user_seconds, reply_seconds,
                               not no_baseline, verify, json_out, memory_limit_gib, layout))


@app.command()
def serve(
    host: Optional[str] = typer.Option(None, "--host", help="Address to listen on; not local needs a token \\[serve.host]."),
    port: Optional[int] = typer.Option(None, "--port", help="TCP port \\[serve.port]."),
    token: Optional[str] = typer.Option(None, "--token", help="Required on every request (or SCA_SERVE_TOKEN) \\[serve.token]."),
    cert: Optional[Path] = typer.Option(None, "--cert", help="TLS certificate (PEM) for https \\[serve.cert]."),
    key: Optional[Path] = typer.Option(None, "--key", help="TLS private key (PEM) \\[serve.key]."),
    config: Optional[Path] = ConfigOpt,
    model: Optional[str] = ModelOpt,
    dtype: Optional[str] = DtypeOpt,
    device_map: Optional[str] = DeviceMapOpt,
    load_in_8bit: Optional[bool] = Int8Opt,
    quantize: Optional[str] = QuantizeOpt,
    voice: Optional[str] = VoiceOpt,
    system_prompt: Optional[str] = SystemOpt,
    greedy: Optional[bool] = GreedyOpt,
) -> None:
    """Serve the browser page and the /ws/pcm16 socket (one conversation at a time)."""
    from duplex_chat.server import run_serve

    flags = model_flags(model, dtype, device_map, load_in_8bit, quantize, voice, system_prompt,
                        greedy)
    flags.update({"serve.host": host, "serve.port": port, "serve.token": token,
                  "serve.cert": str(cert) if cert is not None else None,
                  "serve.key": str(key) if key is not None else None})
    raise typer.Exit(run_serve(settings_from(config, **flags)))


def main(argv: list[str] | None = None) -> None:
    """Console entry point: run the app, turning `DuplexError` into one line and an exit code.

    Typer's standalone mode already turns usage errors into a message and exit code 2.
    """
    try:
        app(args=argv, prog_name="duplex-chat")
    except DuplexError as exc:
        print(f"duplex-chat: {exc}", file=sys.stderr)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        print("duplex-chat: stopped.", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
