"""The API process's end of the engine process's pipe: a sender thread and a reader thread.

Why threads and not the event loop's reader: the pipe is a socketpair, one socket for both
directions, and uvloop (uvicorn's loop wherever it is installed, as `uvicorn[standard]`
installs it) sets O_NONBLOCK on every fd handed to add_reader. multiprocessing's Connection
is written for blocking I/O: on a non-blocking socket, a send into a full buffer raises EAGAIN
(the command is lost, or half of it is written, which breaks the framing of every later
message), and a recv that finds half a message raises BlockingIOError. Issue 25 was that: a
burst of 200 abandoned streams filled the buffer, 33 aborts were lost, and a BlockingIOError
in the reader was taken for the engine's death, so the server answered 503 for good with its
engine alive. Here the socket stays blocking and no event loop ever watches it.

A full pipe is back-pressure, never an error. The sender thread waits in send until the engine
process reads its commands (it does between steps). The reader hands the event loop each batch
of messages in one call_soon_threadsafe (one wake-up per step, or fewer) and reads on only once
the loop has taken it, so a loop that falls behind makes the engine wait in its send instead
of queueing steps without bound. While closing, the reader reads and drops, so an engine that
is sending can always get to the stop command.

The engine is dead only when its process has exited: the reader sees the pipe's end of file or
the process's sentinel, and reports ("dead", why) with the exit code.
"""

from __future__ import annotations

import asyncio
import logging
import os
import queue
import threading
from collections.abc import Callable
from multiprocessing.connection import wait
from multiprocessing.reduction import ForkingPickler

logger = logging.getLogger("nanorun.server")

MAX_BATCH = 64          # messages handed to the event loop in one wake-up, at the most
_EXIT_WAIT_S = 5.0      # after the pipe's end of file, how long the exit code is waited for
_POLL_S = 0.1           # how often a wait checks whether the link is closing


class EngineLink:
    """Commands to an engine process and its messages back, off the event loop.

    start(loop, on_messages): on_messages(list of messages) then runs on `loop` for every
    batch the engine sends, in order, ending with [("dead", why)] once the process has exited
    (unless close() came first). send(command) never blocks: the command is pickled here (so
    an unpicklable one raises to the caller) and written by the sender thread."""

    def __init__(self, conn, process) -> None:
        self.conn, self.process = conn, process
        os.set_blocking(conn.fileno(), True)      # whatever touched it before
        self._outbox: queue.SimpleQueue = queue.SimpleQueue()
        self._closing = threading.Event()
        self._threads: list[threading.Thread] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._on_messages: Callable[[list], None] | None = None

    def start(self, loop: asyncio.AbstractEventLoop,
              on_messages: Callable[[list], None]) -> None:
        self._loop, self._on_messages = loop, on_messages
        self._threads = [threading.Thread(target=self._write, name="nanorun-engine-send",
                                          daemon=True),
                         threading.Thread(target=self._read, name="nanorun-engine-read",
                                          daemon=True)]
        for t in self._threads:
            t.start()

    def send(self, command: tuple) -> None:
        self._outbox.put(ForkingPickler.dumps(command))

    def close(self, timeout: float) -> None:
        """Send a stop, wait up to `timeout` for the process to exit (then kill it), and end
        both threads; idempotent."""
        if self.conn.closed:
            return
        self._closing.set()
        if self._threads:
            self.send(("stop",))
            self._outbox.put(None)             # the sender ends after the stop
        else:                                  # never started: nobody else uses the pipe
            try:
                self.conn.send(("stop",))
            except OSError:
                pass
        self.process.join(timeout)
        if self.process.is_alive():
            logger.warning("the engine process did not stop in %.0f s: killing it", timeout)
            self.process.kill()
            self.process.join(_EXIT_WAIT_S)
        for t in self._threads:     # the reader sees the end of file; the sender its None
            t.join(_EXIT_WAIT_S)    # (or a broken pipe, if the engine exited first)
        self.conn.close()

    # -- sender thread ----------------------------------------------------------------------
    def _write(self) -> None:
        while (data := self._outbox.get()) is not None:
            try:
                self.conn.send_bytes(data)     # blocks while the engine's buffer is full
            except OSError as e:               # it exited: the reader reports that
                if not self._closing.is_set():
                    logger.warning("the engine process no longer reads its commands: %s", e)
                return

    # -- reader thread ----------------------------------------------------------------------
    def _read(self) -> None:
        sentinel = self.process.sentinel
        while True:
            ready = wait([self.conn, sentinel])
            batch, ended = self._drain()
            if batch and not self._closing.is_set():
                self._hand(batch)
            if ended or (sentinel in ready and not batch):
                break
        if not self._closing.is_set():
            self._hand([("dead", self._death())])

    def _drain(self) -> tuple[list, bool]:
        """The messages waiting (MAX_BATCH at the most), and whether the pipe has ended."""
        batch: list = []
        try:
            while len(batch) < MAX_BATCH and self.conn.poll(0):
                batch.append(self.conn.recv())    # blocking: a whole message, however sent
        except (EOFError, OSError):
            return batch, True
        return batch, False

    def _hand(self, batch: list) -> None:
        """Run on_messages(batch) on the loop and wait until it has (or the link closes)."""
        taken = threading.Event()

        def deliver() -> None:
            try:
                self._on_messages(batch)
            finally:
                taken.set()

        loop = self._loop
        try:
            loop.call_soon_threadsafe(deliver)
        except RuntimeError:                   # the loop has closed: nobody reads any more
            self._closing.set()
            return
        while not taken.wait(_POLL_S):
            if self._closing.is_set() or loop.is_closed():
                self._closing.set()
                return

    def _death(self) -> str:
        self.process.join(_EXIT_WAIT_S)        # the pipe ends a moment before the process
        code = self.process.exitcode
        if code is None:
            return "the engine process closed its pipe and has not exited"
        return f"the engine process exited (exit code {code})"
