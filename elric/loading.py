"""The job code a worker runs: Job classes from the modules it was told to load at start
(``elric worker myproject.jobs`` or JOB_MODULES). A job message only names a class; it
never makes a worker import anything, since whoever can write to Redis can write one."""

from __future__ import annotations

import importlib
import logging
import sys
from dataclasses import dataclass, field

from elric.contract import DEFAULT_QUEUE, SpecError

log = logging.getLogger("elric.worker")
WHERE = " (from the folder that holds it, or with that folder on PYTHONPATH)"


class NotLoaded(Exception):
    """This worker does not load the job's module; a worker that does may run it."""


class ModuleBroken(Exception):
    """The job's module is one this worker was told to load, and importing it failed."""


@dataclass
class JobModules:
    names: tuple[str, ...]
    broken: dict[str, str] = field(default_factory=dict)   # module -> its import error
    not_found: set[str] = field(default_factory=set)   # broken: itself, not what it imports
    _classes: dict[str, type] = field(default_factory=dict)   # func -> its class, as found
    _runs: dict[str, bool] = field(default_factory=dict)      # func -> runs(func)

    @classmethod
    def load(cls, names) -> "JobModules":
        """Import each module named; one that fails is noted in ``broken`` (its jobs fail)."""
        modules = cls(tuple(names))
        for name in modules.names:
            try:
                importlib.import_module(name)
            except SystemExit as exc:   # a script's sys.exit or parse_args ended the worker
                modules.broken[name] = (f"SystemExit: {exc}; it exits as it imports: put a "
                                        "script's code under if __name__ == '__main__'")
            except Exception as exc:
                modules.broken[name] = f"{type(exc).__name__}: {exc}"
                if isinstance(exc, ModuleNotFoundError) and exc.name is not None and (
                        name + ".").startswith(exc.name + "."):
                    modules.not_found.add(name)
        return modules

    def log_broken(self) -> None:
        """A line for each module that did not import, or that defines no Job class (`elric
        worker json`, or a typo naming another module of the project)."""
        for name, error in self.broken.items():
            log.error("cannot import job module %s (%s): its jobs fail on this worker until it "
                      "is started again where the module imports%s", name, error,
                      WHERE if name in self.not_found else "")
        for name in self.clean():
            if not any(job_classes(name)):
                log.warning("job module %s defines no Job class, so this worker runs none of "
                            "its jobs (a class imported into it runs under its own module's "
                            "name: load that module)", name)

    def runs_nothing(self) -> str | None:
        """Why this worker would run no job though a module imported, or None: none defines
        a Job class (`elric worker examples.crawler`, whose Crawl is elric.demo.crawler's)."""
        clean = self.clean()
        if any(any(job_classes(name)) for name in clean):
            return None
        from elric.job import Job

        imported = [f"{name} imports {value.__module__}'s {value.__qualname__}"
                    for name in clean for value in vars(sys.modules[name]).values()
                    if isinstance(value, type) and issubclass(value, Job) and value is not Job]
        whys = imported + [f"{name} did not import: {error}"
                           for name, error in self.broken.items()]
        return (f"no Job class is defined in job module{'s' * (len(clean) > 1)} "
                f"{', '.join(clean)}, so this worker would run nothing: name the modules that "
                f"define them" + (f" ({'; '.join(whys)})" if whys else ""))

    def log_other_queues(self, queues: list[str]) -> None:
        """A warning when every Job class loaded sends its jobs to queues this worker does
        not take: it would sit idle while they wait (a worker started without --queues)."""
        theirs = {cls.__name__: cls.queue or DEFAULT_QUEUE
                  for name in self.clean() for cls in job_classes(name)}
        if theirs and not set(theirs.values()) & set(queues):
            log.warning("this worker takes queue(s) %s, and its Job classes send their jobs to "
                        "%s: start it with --queues %s, or their jobs wait for another worker",
                        ",".join(queues), ", ".join(f"{q} ({c})" for c, q in theirs.items()),
                        ",".join(sorted(set(theirs.values()))))

    def clean(self) -> list[str]:
        """The modules that imported without an error."""
        return [n for n in self.names if n not in self.broken]

    def runs(self, func: str) -> bool:
        """Whether jobs of ``func`` are this worker's: from a module it loaded (or failed to)."""
        known = self._runs.get(func)
        if known is None:
            module = func.partition(":")[0]
            known = self._runs[func] = module in self.broken or (module in sys.modules and any(
                (module + ".").startswith(n + ".") for n in self.names))
        return known

    def job_class(self, func: str) -> type:
        """The Job class ``func`` names, from a loaded module; never imports."""
        cls = self._classes.get(func)
        if cls is not None:
            return cls
        from elric.job import Job  # a cycle: job.py submits through the contract

        module, _, attr = func.partition(":")
        if module in self.broken:
            raise ModuleBroken(f"job module {module} failed to import on this worker: "
                               f"{self.broken[module]}")
        if not self.runs(func):
            raise NotLoaded(f"this worker does not load module {module!r} "
                            f"(it loads {', '.join(self.names)})")
        obj = sys.modules[module]
        for part in attr.split("."):
            obj = getattr(obj, part, None)
        if obj is None:
            raise SpecError(f"func {func!r}: module {module!r} has no {attr!r}")
        if not (isinstance(obj, type) and issubclass(obj, Job) and obj is not Job):
            raise SpecError(f"func {func!r}: {obj!r} is not a subclass of elric.Job")
        self._classes[func] = obj
        return obj


def job_classes(module: str):
    """The Job classes of ``module`` (and of the modules under it) imported so far."""
    from elric.job import Job

    todo = Job.__subclasses__()
    while todo:
        cls = todo.pop()
        if (cls.__module__ + ".").startswith(module + "."):
            yield cls
        todo += cls.__subclasses__()
