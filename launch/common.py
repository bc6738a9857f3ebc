"""What every launcher shares: user errors as one `error:` line and exit code 2, the command line,
and the devices (jax.distributed from the multi-host flags, the layer mesh from --mesh)."""
from __future__ import annotations

import os
import shlex
import sys

import logging as stdlib_logging

from absl import app, flags
from absl import logging as absl_logging

from prunenet_jax import progress
from prunenet_jax.errors import UserError, WriteError
from prunenet_jax.files import atomic
from prunenet_jax.launch import flag_checks
from prunenet_jax.launch import flags as launch_flags


def _fail(message: str, code: int = 2) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(code)


def _fail_now(message: str) -> None:
    """_fail after a failed write, skipping interpreter shutdown: orbax's writer threads may still
    be running the failed save, and would print tracebacks as the interpreter tears down."""
    print(f"error: {message}", file=sys.stderr)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(2)


INTERRUPTED = ("interrupted (Ctrl-C); finished outputs and the last training checkpoint are kept: "
               "rerun the same command to continue (launch.prune: add --resume)")


def _parse_flags(argv):
    try:
        return flags.FLAGS(argv)
    except flags.Error as e:
        _fail(f"{str(e).removeprefix('ERROR:: ')}; run with --help to see the flags")
    except UnicodeDecodeError as e:  # absl reads a --flagfile as UTF-8 text
        files = [a.split("=", 1)[1] for a in argv[1:] if a.startswith(("--flagfile=", "-flagfile="))]
        _fail(f"--flagfile={','.join(files) or '?'}: not UTF-8 text ({e.reason} at byte {e.start}); "
              "save the flag file as UTF-8 text, one --name=value per line")


def _asks_help(argv) -> bool:
    """--help (-h, -?, --helpshort): our grouped help instead of absl's; --helpfull stays absl's."""
    for arg in argv[1:]:
        if arg == "--":
            break
        name, _, value = arg.lstrip("-").partition("=")
        if arg.startswith("-") and name in ("help", "helpshort", "h", "?") and value.lower() not in (
                "false", "0"):
            return True
    return False


class _QuietOrbax(stdlib_logging.Filter):
    """orbax logs every save and restore step at INFO; keep its warnings and errors only, except
    the tracebacks of a failed write (full disk, lost permission), which the run reports as its
    one `error:` line."""

    def filter(self, record):
        if "/orbax/" not in record.pathname:
            return True
        if record.levelno < stdlib_logging.WARNING:
            return False
        error = record.exc_info[1] if record.exc_info else Exception(record.getMessage())
        return atomic.write_failure(error) is None


class _QuietBackends(stdlib_logging.Filter):
    """JAX's INFO lines (`Unable to initialize backend 'tpu': ... libtpu.so` on every machine
    without a TPU) say nothing a user can act on; its warnings stay."""

    def filter(self, record):
        return not (record.name.split(".")[0] == "jax" and record.levelno < stdlib_logging.WARNING)


def run(main) -> None:
    """absl app.run, with flag errors and UserErrors reported as one line and exit code 2; --help
    lists the launcher's flags by group (launch/flags.py), every one of them an absl key flag of
    the launcher; log lines are written above the progress bars, without the noise of orbax and
    of JAX's backend probe."""
    module = main.__module__
    launch_flags.declare_key_flags(module)

    def parse(argv):
        if _asks_help(argv):
            try:
                print(launch_flags.help_text(module, sys.modules[module].__doc__), flush=True)
            except BrokenPipeError:  # `--help | head`
                os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            sys.exit(0)
        return _parse_flags(argv)

    def guarded(argv):
        absl_logging.get_absl_logger().addFilter(_QuietOrbax())
        absl_logging.get_absl_handler().addFilter(_QuietBackends())
        progress.log_above_bars()
        if len(argv) > 1:
            _fail(f"unexpected arguments {argv[1:]}; every option is a --flag (see --help)")
        try:
            flag_checks.check_flags([n for names in launch_flags.launcher_flags(module).values()
                                     for n in names])
            return main(argv)
        except WriteError as e:
            _fail_now(str(e))
        except UserError as e:
            _fail(str(e))
        except KeyboardInterrupt as e:  # errors.Interrupted says where it stopped
            _fail(str(e) or INTERRUPTED, 130)
        except Exception as e:  # a full disk or lost permission that no writer translated
            reason = atomic.write_failure(e)
            if reason is None:
                raise
            _fail_now(f"{reason} ({type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}); "
                  "free space or restore write access, then rerun the same command")

    app.run(guarded, flags_parser=parse)


def init_distributed() -> None:
    """jax.distributed.initialize from the multi-host flags, when they are given."""
    f = flags.FLAGS
    if f.coordinator_address is None and f.num_processes is None and f.process_id is None:
        return
    if None in (f.coordinator_address, f.num_processes, f.process_id):
        raise UserError("multi-host runs need all of --coordinator_address, --num_processes and "
                        "--process_id (or none of them, on one host)")
    if not 0 <= f.process_id < f.num_processes:
        raise UserError(f"--process_id={f.process_id} must be in [0, --num_processes="
                        f"{f.num_processes})")
    import jax

    # After training, processes other than 0 wait at shutdown while process 0 prunes, evaluates
    # and writes, which can take far longer than jax's default 5-minute shutdown barrier.
    jax.distributed.initialize(coordinator_address=f.coordinator_address,
                               num_processes=f.num_processes, process_id=f.process_id,
                               shutdown_timeout_seconds=24 * 3600)


def make_mesh():
    """The 1-D layer mesh over --mesh devices (all by default); None for a single device."""
    import jax

    from prunenet_jax.method import sharding

    n, available = flags.FLAGS.mesh, jax.device_count()
    if n < 0 or n > available:
        raise UserError(f"--mesh={n} asks for more devices than the {available} present; use "
                        f"--mesh between 1 and {available} (0: all)")
    n = n or available
    return None if n == 1 else sharding.make_mesh(n)


def command_line() -> str:
    """The command this process was started with, for model cards and manifests."""
    prog = os.path.basename(sys.argv[0])
    if prog.endswith(".py"):  # python -m launch.<name>
        return " ".join([f"python -m launch.{prog[:-3]}", shlex.join(sys.argv[1:])]).strip()
    return shlex.join([prog, *sys.argv[1:]])


def start_devices():
    """jax.distributed (multi-host flags), then the layer mesh (--mesh); what the library calls
    once its cheap checks have passed."""
    init_distributed()
    return make_mesh()
