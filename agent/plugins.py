"""Typed stevedore loading of plugins by kind and name, the context each one is built with, and
``option_problems``: the plugins' own checks of their config sub-tables, as ``pathagent run`` meets them."""
from __future__ import annotations

from typing import Any, Callable

from stevedore import driver, extension
from stevedore.exception import NoMatches

from agent.backend import Catalog, Fencing, NetworkBackend, PluginContext, TargetBackend, Watchdog
from agent.config import Config
from agent.errors import ConfigError

NAMESPACES: dict[str, tuple[str, type]] = {
    "target": ("pathagent.targets", TargetBackend),
    "network": ("pathagent.network", NetworkBackend),
    "catalog": ("pathagent.catalogs", Catalog),
    "watchdog": ("pathagent.watchdog", Watchdog),
    "fencing": ("pathagent.fencing", Fencing),
}


def context(cfg: Config, kind: str, node: str = "", wake: Callable[[], None] | None = None,
            ceph_probe: Callable[[str, str], None] | None = None,
            may_serve: Callable[[], bool] | None = None,
            node_name: Callable[[], str] | None = None) -> PluginContext:
    """The ``PluginContext`` for the configured plugin of ``kind``."""
    table = getattr(cfg, kind)
    extra: dict[str, Any] = {"wake": wake} if wake is not None else {}
    if may_serve is not None:
        extra["may_serve"] = may_serve
    if node_name is not None:
        extra["node_name"] = node_name
    return PluginContext(node=node, state_dir=cfg.state_dir, options=table.own(), ceph=cfg.ceph, port=cfg.port,
                         config_file=cfg.source, ceph_probe=ceph_probe, **extra)


def option_problems(cfg: Config) -> list[tuple[str, str]]:
    """Every problem the configured plugins find in their own settings: each kind's configured plugin
    (its ``backend``, the one ``pathagent run`` builds) is constructed with the context ``run`` gives it
    and closed again. A plugin constructor validates its sub-table (``plugins.options.Options``) and must
    touch nothing (``agent.backend``), so this starts, opens and connects nothing. ``run`` builds them in
    turn and stops at the first ``ConfigError``; this collects the problems of all of them. A plugin
    whose name is unknown is skipped (``config.examine`` reports it); one that fails otherwise while
    being built (a bug in it) is reported under ``{kind}.backend``, as ``run`` would fail on it."""
    out: list[tuple[str, str]] = []
    for kind in NAMESPACES:
        name = getattr(cfg, kind).backend
        try:
            cls = plugin_class(kind, name)
        except ConfigError:
            continue
        try:
            obj = cls(context(cfg, kind, cfg.node_name))
        except ConfigError as e:
            out.extend(e.problems)
            continue
        except Exception as e:  # noqa: BLE001 - a plugin bug: run would fail on it the same way
            out.append((f"{kind}.backend", f"{kind} plugin {name!r} could not be built: {type(e).__name__}: {e}"))
            continue
        close = getattr(obj, "close", None)
        if callable(close):
            try:
                close()
            except Exception:  # noqa: BLE001 - nothing was started; a failing close changes no verdict
                pass
    return out


def available(kind: str) -> list[str]:
    """Names registered for a plugin kind (``target``, ``network``, ``catalog``)."""
    ns, _ = NAMESPACES[kind]
    mgr: extension.ExtensionManager[Any] = extension.ExtensionManager(namespace=ns, invoke_on_load=False)
    return sorted(mgr.names())


def plugin_class(kind: str, name: str) -> type:
    """The class registered as ``name`` for ``kind``; ``ConfigError`` naming the choices if unknown."""
    ns, base = NAMESPACES[kind]
    try:
        mgr: driver.DriverManager[Any] = driver.DriverManager(namespace=ns, name=name, invoke_on_load=False)
    except NoMatches:
        raise ConfigError([(f"{kind}.backend", f"unknown {kind} plugin {name!r}; available: "
                            f"{', '.join(available(kind)) or 'none'}")]) from None
    except Exception as e:  # a plugin that fails to import
        raise ConfigError([(f"{kind}.backend", f"{kind} plugin {name!r} failed to load: {e}")]) from e
    cls = mgr.driver
    if not (isinstance(cls, type) and issubclass(cls, base)):
        raise ConfigError([(f"{kind}.backend", f"{name!r} in {ns} is not a {base.__name__}")])
    return cls


def _load(kind: str, name: str, ctx: PluginContext) -> Any:
    return plugin_class(kind, name)(ctx)


def load_target(name: str, ctx: PluginContext) -> TargetBackend:
    """Instantiate target backend ``name`` (namespace ``pathagent.targets``)."""
    obj = _load("target", name, ctx)
    assert isinstance(obj, TargetBackend)
    return obj


def load_network(name: str, ctx: PluginContext) -> NetworkBackend:
    """Instantiate network backend ``name`` (namespace ``pathagent.network``)."""
    obj = _load("network", name, ctx)
    assert isinstance(obj, NetworkBackend)
    return obj


def load_watchdog(name: str, ctx: PluginContext) -> Watchdog:
    """Instantiate watchdog ``name`` (namespace ``pathagent.watchdog``)."""
    obj = _load("watchdog", name, ctx)
    assert isinstance(obj, Watchdog)
    return obj


def load_fencing(name: str, ctx: PluginContext) -> Fencing:
    """Instantiate fencing ``name`` (namespace ``pathagent.fencing``)."""
    obj = _load("fencing", name, ctx)
    assert isinstance(obj, Fencing)
    return obj


def load_catalog(name: str, ctx: PluginContext) -> Catalog:
    """Instantiate catalog ``name`` (namespace ``pathagent.catalogs``)."""
    obj = _load("catalog", name, ctx)
    assert isinstance(obj, Catalog)
    return obj
