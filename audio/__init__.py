"""Audio for duplex-chat: files, devices, resampling, features, voice activity, echo.

Modules (import them directly; this package imports nothing heavy on its own):
  constants  rates and sizes with units: 16 kHz in, 24 kHz out, 12.5 codec frames/s, 512-sample
             VAD windows, Whisper-style mel parameters.
  files      read any WAV/FLAC/OGG/MP3 (any rate, channels, sample format) as 16 kHz mono float32,
             whole (`read_audio`) or block by block (`iter_audio_blocks`); `audio_info`; `write_wav`;
             `WavWriter`, a wav written as audio arrives whose header stays right (crash-safe).
  resample   `StreamResampler`: soxr's streaming resampler for chunked audio (files, mic, speaker).
  vad        `SileroVad` probabilities and the streaming `VoiceActivity` speech detector (the
             session's turn policy runs it, for talk and replay alike).
  levels     `level_db`: RMS level in dBFS (talk's input meter, the session's echo checks).
  devices, stream, features, echo  sound devices, live streams, log-mel features, echo cancelling.

Everything here works on NumPy float32 arrays in [-1, 1]; sample indices count 16 kHz samples.
This package never imports `duplex_chat.model` or `duplex_chat.cli`.
"""
