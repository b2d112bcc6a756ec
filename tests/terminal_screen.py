"""A minimal terminal emulator for checking what a user would see: it replays the bytes a program
wrote to a terminal (text, CR, LF, and the few escape sequences rich uses to redraw a live area)
onto a grid, so a test can read the screen's final lines instead of the raw stream.

Unknown escape sequences raise, so a test never passes by ignoring what it cannot interpret."""

from __future__ import annotations

import re

CSI = re.compile(r"\x1b\[([?0-9;]*)([A-Za-z])")


class Screen:
    """`width` columns, unlimited rows (nothing scrolls away). Feed it text with `feed`."""

    def __init__(self, width: int):
        self.width = width
        self.rows: list[list[str]] = [[]]
        self.row = self.col = 0

    def feed(self, data: str) -> None:
        position = 0
        while position < len(data):
            match = CSI.match(data, position)
            if match:
                self._csi(match.group(1), match.group(2))
                position = match.end()
                continue
            char = data[position]
            position += 1
            if char == "\r":
                self.col = 0
            elif char == "\n":  # a tty's onlcr turns LF into CR LF; a plain file means the same
                self._down()
                self.col = 0
            elif char == "\x1b":
                raise ValueError(f"unknown escape sequence {data[position - 1:position + 8]!r}")
            elif char >= " ":
                self._put(char)

    def lines(self) -> list[str]:
        """The screen's rows as text, trailing blanks removed, trailing empty rows dropped."""
        text = ["".join(row).rstrip() for row in self.rows]
        while text and not text[-1]:
            text.pop()
        return text

    def _put(self, char: str) -> None:
        if self.col >= self.width:  # auto-wrap, as terminals do
            self._down()
            self.col = 0
        row = self.rows[self.row]
        row.extend(" " * (self.col + 1 - len(row)))
        row[self.col] = char
        self.col += 1

    def _down(self) -> None:
        self.row += 1
        while len(self.rows) <= self.row:
            self.rows.append([])

    def _csi(self, params: str, command: str) -> None:
        n = int(params) if params.isdigit() else 1
        if command == "m" or params in ("?25", "?1049", "?2004", "?1"):
            return  # colours and modes change nothing on the grid
        if command == "A":
            self.row = max(0, self.row - n)
        elif command == "B":
            for _ in range(n):
                self._down()
        elif command == "C":
            self.col = min(self.width - 1, self.col + n)
        elif command == "D":
            self.col = max(0, self.col - n)
        elif command == "G":
            self.col = n - 1
        elif command == "K":
            row = self.rows[self.row]
            if params in ("", "0"):
                del row[self.col:]
            elif params == "1":
                row[:self.col] = " " * min(self.col, len(row))
            elif params == "2":
                row.clear()
            else:
                raise ValueError(f"unknown erase {params!r}")
        else:
            raise ValueError(f"unknown escape sequence CSI {params!r} {command!r}")
