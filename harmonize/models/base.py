"""What every harmonizer shares: scikit-learn's parameter face and the site lookup of a fitted model."""

from __future__ import annotations

import inspect


class HarmonizerBase:
    """Parameters are the arguments of ``__init__``, stored under their own names (as in scikit-learn), so
    `get_params` needs no list of its own; fitted models have ``sites_`` and a ``_require_fitted`` check."""

    sites_: list[str]

    @classmethod
    def _param_names(cls) -> tuple[str, ...]:
        return tuple(p for p in inspect.signature(cls.__init__).parameters if p != "self")

    def get_params(self) -> dict:
        """The parameters, JSON-ready (tuples as lists): what a saved model's config.json holds."""
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in
                ((k, getattr(self, k)) for k in self._param_names())}

    def set_params(self, **params):
        known = self._param_names()
        for k, v in params.items():
            if k not in known:
                raise ValueError(f"unknown parameter {k!r} for {type(self).__name__}; known: {list(known)}")
            setattr(self, k, v)
        return self

    def _require_fitted(self) -> None:
        raise NotImplementedError

    def covariates_needed(self) -> tuple[str, ...]:
        """Covariates every subject must have for this model (fit and apply); none by default."""
        return ()

    def site_code(self, site: str) -> int:
        """The site's position in the training site order; a clear error for a site never seen."""
        self._require_fitted()
        if site not in self.sites_:
            raise ValueError(f"site {site!r} was not seen in training (sites: {self.sites_}); "
                             "refit with subjects from that site")
        return self.sites_.index(site)
