"""The protocol-independent path of one request, shared by /v1 and the Open Inference Protocol:

    admit (service.admission) -> decode and validate the upload once (skin.images) -> the resize half of
    each member's eval preset (uint8) -> fan out to the members concurrently -> the ensemble's answer
    (skin.ensemble.Predictor.remote: the same arithmetic as `skin predict`) with its map and overlay.

A route turns its protocol's request into a call of `DataPlane.answer` and the answer dict into its
protocol's response; errors are `service.errors.ApiError`, which each protocol renders in its shape.
"""
import asyncio
import base64
import logging
import time
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

from . import canary
from .admission import Admission, Busy, Ticket
from .config import IngressSettings
from .errors import ApiError
from .members import DEFAULT_OPTIONS

logger = logging.getLogger("ray.serve")


class Variant:
    """One bundle the ingress serves (the stable one, or a candidate beside it): its ensemble's arithmetic
    (skin.ensemble.Predictor.remote: weights, temperature, the maps' work size) and its member deployments."""

    def __init__(self, role: str, bundle_dir: str, handles: Dict[str, Any], uncertain_below: float) -> None:
        from skin.bundle import Bundle
        from skin.ensemble import Predictor
        self.role = role
        self.bundle = Bundle.load(bundle_dir)
        self.handles = dict(handles)
        self.ensemble = Predictor.remote(self.bundle, uncertain_below)
        self.data_configs = {e.name: e.data_config for e in self.bundle.members}
        self.checked = set()  # (member, layer) pairs a request named that exist

    def check_layers(self, explain) -> None:
        """The layers a request ({member: Overrides}) names exist in their members (ExplanationError),
        checked once per pair."""
        new = {n: o for n, o in explain.items() if o.layer and (n, o.layer) not in self.checked}
        if new:
            self.bundle.check_explain(new)
            self.checked |= {(n, o.layer) for n, o in new.items()}


def prepare_inputs(data_configs: Dict[str, Any], image) -> Dict[str, np.ndarray]:
    """What the ingress sends each member: the resize half of its eval preset (uint8 CHW), once per
    distinct data config; the member applies the other half (skin.presets.eval_pixels)."""
    from skin.presets import eval_geometry
    prepared: Dict[Any, np.ndarray] = {}
    for cfg in data_configs.values():
        if cfg not in prepared:
            prepared[cfg] = eval_geometry(cfg)(image).numpy()
    return {name: prepared[cfg] for name, cfg in data_configs.items()}


class DataPlane:
    """The stable bundle (and a candidate), the admission of requests, and the path of one answer."""

    def __init__(self, stable: Variant, candidate: Optional[Variant], metrics) -> None:
        self.stable, self.candidate, self.metrics = stable, candidate, metrics
        self.admission = Admission()
        self.settings = IngressSettings()
        self.limits = self.settings.limits()

    def configure(self, settings: IngressSettings, parallel: float) -> None:
        self.settings, self.limits = settings, settings.limits()
        self.admission.configure(settings.latency_budget, parallel)
        for v in self.variants():
            v.ensemble.uncertain_below = settings.uncertain_below

    def variants(self) -> List[Variant]:
        return [self.stable] + ([self.candidate] if self.candidate else [])

    def choose(self, pin: Optional[str]) -> Tuple[Variant, bool]:
        return canary.choose(self.variants(), pin, self.settings.candidate_share)

    async def admit(self, kind) -> Ticket:
        """Admission (service.admission) of a request of this kind, after a short wait for room at most, or
        ApiError 503 busy."""
        try:
            ticket = await self.admission.admit_waiting(kind)
        except Busy as e:
            self.metrics.refused.inc(1, tags={"cam": str(dict(kind).get("cam", "true")).lower()})
            raise ApiError(503, "busy", str(e), retry_after_s=e.retry_after_s) from None
        self.metrics.in_flight.set(len(self.admission.in_flight))
        return ticket

    def release(self, ticket: Ticket, answered: bool) -> None:
        self.admission.done(ticket, answered)
        self.metrics.in_flight.set(len(self.admission.in_flight))

    records = None  # service.records.RecordWriter, when the deployment records answers

    async def answer(self, variant: Variant, pinned: bool, data: bytes, t0: float, ticket: Ticket, *,
                     cam: bool = True, alpha: float = 0.4, all_classes: bool = False, class_name: Optional[str] = None,
                     explain: Optional[Dict[str, Any]] = None, render: bool = True,
                     request_id: str = "", route: str = "v1", consent: bool = False) -> Dict[str, Any]:
        """One upload's answer (the /v1/predict JSON; with `render=False` the raw ensemble map, no PNGs), or
        ApiError; `ticket`: its admission, released here. The answer is recorded (off its path)."""
        answered = False
        try:
            out = await self._routed(variant, pinned, data, t0, cam=cam, alpha=alpha, all_classes=all_classes,
                                     class_name=class_name, explain=explain or {}, render=render)
            answered = True
            self.record(out, data, request_id, route, consent, t0, {"cam": cam, "class": class_name,
                                                                     "options": explain or {}})
            return out
        finally:
            self.release(ticket, answered)

    def record(self, answer: Dict[str, Any], data: bytes, request_id: str, route: str, consent: bool, t0: float,
               explanation: Dict[str, Any]) -> None:
        """Hand the answer's record to the writer (microseconds; service.records). The photograph's bytes go
        with it only when the deployment keeps photographs (photos_dir) and the request says the patient
        consented; otherwise only its SHA-256. `answer["photo_kept"]` says which."""
        answer["photo_kept"] = False
        if self.records is None or not request_id:
            return
        from skin.records import answer_row, sha256
        keep = bool(consent and self.records.photos is not None)
        row = answer_row(request_id, answer, sha256(data), route, (time.perf_counter() - t0) * 1e3, explanation)
        self.records.submit(row, data if keep else None, _suffix(data))
        answer["photo_kept"] = keep

    async def _routed(self, variant: Variant, pinned: bool, data: bytes, t0: float, **kwargs) -> Dict[str, Any]:
        """The chosen bundle's answer; a candidate that cannot answer an unpinned request leaves it to the
        stable bundle (its failure never fails a stable answer)."""
        try:
            return await self._predict(variant, data, t0, **kwargs)
        except ApiError as e:
            if variant is self.stable or pinned or e.status != 503 or e.code == "busy":
                raise
            logger.warning("candidate %s failed (%s); answering with the stable bundle", variant.bundle.id, e.message)
            kwargs["explain"] = {}  # the options were checked against the candidate's members
            return await self._predict(self.stable, data, t0, **kwargs)

    async def _predict(self, variant: Variant, data: bytes, t0: float, cam: bool = True, alpha: float = 0.4,
                       all_classes: bool = False, class_name: Optional[str] = None,
                       explain: Optional[Dict[str, Any]] = None, render: bool = True) -> Dict[str, Any]:
        explain = explain or {}
        image = await self._decode(data)
        t_decode = time.perf_counter()
        inputs = await asyncio.to_thread(prepare_inputs, variant.data_configs, image)
        # without `cam` the members compute no maps; `explain` overrides each one's stored Explanation
        options = {n: (cam, explain.get(n) or None) for n in inputs}
        results, missing = await self._fan_out(variant, {n: x if options[n] == DEFAULT_OPTIONS else (x, options[n])
                                                         for n, x in inputs.items()})
        t_members = time.perf_counter()
        # maps, overlay and PNG encoding off the event loop, so other requests keep flowing
        answer = await asyncio.to_thread(self._answer, variant, results, missing, image, cam, alpha, all_classes,
                                         class_name, render)
        t_end = time.perf_counter()
        answer["batch_sizes"] = {n: int(r["batch"]) for n, r in results.items()}
        answer["timings_ms"] = {"decode": (t_decode - t0) * 1e3, "members": (t_members - t_decode) * 1e3,
                                "gradcam_and_response": (t_end - t_members) * 1e3, "total": (t_end - t0) * 1e3,
                                **{f"{n}_compute": r["compute_ms"] for n, r in results.items()}}
        self.metrics.answer(answer, {n: r["compute_ms"] for n, r in results.items()},
                            (t_end - t_members) * 1e3 if cam else None)
        return answer

    async def occlusion(self, variant: Variant, data: bytes, t0: float, ticket: Ticket, *, alpha: float = 0.4,
                        class_name: Optional[str] = None, request_id: str = "", consent: bool = False
                        ) -> Dict[str, Any]:
        """One upload's answer with the ensemble's occlusion sensitivity as its explanation (skin.occlusion:
        the image and its greyed-patch views through every member, the drops of the ensemble's probability),
        under "gradcam" with "method": "occlusion". Costlier than Grad-CAM by skin.occlusion.cost(); asked for
        per request (cam_method=occlusion), never a default. `ticket`: its admission, released here."""
        import torch
        from skin.images import display_copy
        from skin.occlusion import OCCLUSION, map_from_probs, member_views
        from skin.presets import eval_geometry
        from skin.render import map_image, overlay, png_bytes
        answered = False
        try:
            image = await self._decode(data)
            t_decode = time.perf_counter()
            sizes = {n: c.input_size for n, c in variant.data_configs.items()}
            widest = max(sizes, key=sizes.get)
            x = await asyncio.to_thread(lambda: eval_geometry(variant.data_configs[widest])(image))
            views = await asyncio.to_thread(member_views, x, sizes)
            refs = {n: variant.handles[n].probs.remote(views[n].numpy()) for n in variant.handles}
            try:
                got = await asyncio.wait_for(asyncio.gather(*refs.values()), self.settings.occlusion_timeout_s)
            except Exception as e:  # noqa: BLE001 - a member failed or the map took too long: say which
                for r in refs.values():
                    r.cancel()
                raise ApiError(503, "member_unavailable", f"the occlusion map could not be made ({type(e).__name__}: "
                               f"{e or 'over occlusion_timeout_s'}); retry shortly or ask for the default map",
                               retry_after_s=self.settings.retry_after_s) from None
            probs = dict(zip(refs, got))
            t_members = time.perf_counter()

            def finish() -> Dict[str, Any]:
                out = variant.ensemble.answer({n: p[0] for n, p in probs.items()}, class_name=class_name)
                k = variant.bundle.classes.index(class_name) if class_name else out["class_index"]
                m = map_from_probs(torch.from_numpy(variant.ensemble.combine(probs)), k, tuple(x.shape[-2:]))
                disp = display_copy(image, self.settings.overlay_max_side)
                from skin.gradcam import upsample
                full = upsample(m[None], (disp.size[1], disp.size[0]))[0].numpy()
                out["gradcam"] = {"class": variant.bundle.classes.name(k), "method": OCCLUSION,
                                  "forwards": int(len(views[widest])),
                                  "overlay_png": base64.b64encode(png_bytes(overlay(disp, full, alpha))).decode(),
                                  "map_png": base64.b64encode(png_bytes(map_image(full))).decode()}
                return out
            answer = await asyncio.to_thread(finish)
            self.record(answer, data, request_id, "v1", consent, t0, {"cam": True, "class": class_name,
                                                                       "method": OCCLUSION})
            t_end = time.perf_counter()
            answer["timings_ms"] = {"decode": (t_decode - t0) * 1e3, "members": (t_members - t_decode) * 1e3,
                                    "gradcam_and_response": (t_end - t_members) * 1e3, "total": (t_end - t0) * 1e3}
            self.metrics.answer(answer, {}, (t_end - t_decode) * 1e3)
            answered = True
            return answer
        finally:
            self.release(ticket, answered)

    async def _decode(self, data: bytes):
        """The upload decoded and validated once (skin.images), off the event loop; ApiError when it is bad."""
        from skin.images import ImageError, load_image
        try:
            return await asyncio.to_thread(load_image, data, self.limits)
        except ImageError as e:
            raise ApiError(e.status, e.code, str(e)) from None

    async def _fan_out(self, variant: Variant, inputs: Dict[str, Any]):
        """Every member's result concurrently: (results by member, members that failed). A member whose
        queue is full refuses at once (Serve's BackPressureError): the request is refused as busy and what
        the other members started for it is cancelled."""
        from ray.serve.exceptions import BackPressureError
        names = list(variant.handles)
        responses = {n: variant.handles[n].predict.remote(inputs[n]) for n in names}

        async def one(n):
            return await asyncio.wait_for(responses[n], timeout=self.settings.member_timeout_s)
        tasks = {n: asyncio.ensure_future(one(n)) for n in names}
        await asyncio.wait(tasks.values(), return_when=asyncio.FIRST_EXCEPTION)
        if any(t.done() and isinstance(t.exception(), BackPressureError) for t in tasks.values()):
            for n, t in tasks.items():
                if not t.done():
                    t.cancel()
                    responses[n].cancel()
            raise ApiError(503, "busy", "the service is at capacity (a member's queue is full); retry shortly",
                           retry_after_s=self.settings.retry_after_s)
        outs = await asyncio.gather(*tasks.values(), return_exceptions=True)
        results, missing = {}, []
        for n, o in zip(names, outs):
            if isinstance(o, BaseException):
                logger.warning("member %s failed: %s: %s", n, type(o).__name__, o)
                missing.append(n)
            else:
                results[n] = o
        if missing and (not self.settings.allow_degraded or not results):
            raise ApiError(503, "member_unavailable",
                           f"model member(s) {missing} did not answer; retry shortly. The service is "
                           "restarting them" + ("" if self.settings.allow_degraded else
                                                " (degraded answers are disabled on this server)"),
                           retry_after_s=self.settings.retry_after_s)
        return results, missing

    def _answer(self, variant, results, missing, image, cam, alpha, all_classes, class_name, render=True) -> Dict[str, Any]:
        import torch
        from skin.images import display_copy
        from skin.render import map_image, overlay, png_bytes

        def b64(img) -> str:
            return base64.b64encode(png_bytes(img)).decode("ascii")
        disp = display_copy(image, self.settings.overlay_max_side) if cam and render else None
        size = ((disp.size[1], disp.size[0]) if render else variant.ensemble.work) if cam else None
        out = variant.ensemble.answer({n: r["probs"] for n, r in results.items()},
                                      member_maps={n: torch.from_numpy(r["maps"]) for n, r in results.items()}
                                      if cam else None,
                                      size=size, class_name=class_name, all_classes=all_classes, missing=missing)
        if cam and not render:
            return out
        if cam:
            g = out["gradcam"]
            out["gradcam"] = {"class": g["class"], "overlay_png": b64(overlay(disp, g["map"], alpha)),
                              "map_png": b64(map_image(g["map"]))}
            if all_classes:
                out["gradcam"]["maps_png"] = {c: b64(map_image(m)) for c, m in g["maps"].items()}
        return out


def _suffix(data: bytes) -> str:
    """The kept photograph's file suffix from its leading bytes (the validator has accepted it already)."""
    head = data[:16]
    if head.startswith(b"\xff\xd8"):
        return ".jpg"
    if head.startswith(b"\x89PNG"):
        return ".png"
    if head[8:12] == b"WEBP":
        return ".webp"
    return ".heic" if b"ftyp" in head else ".bin"
