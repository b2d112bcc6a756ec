"""The `duplex-chat` command: check, talk, replay and bench, and the terminal view.

`app` parses the command line and turns every `DuplexError` into one clear sentence and a
non-zero exit. `talk` moves audio between the sound devices and a conversation, `replay` between
a file and one, `view` renders their events, `recorder` saves a session; `check` and `bench`
report on the machine and the engine's speed. Model tensors never reach this package: apart from
asking torch about the GPU (`check`, `bench`), it sees the engine's typed events only.
"""
