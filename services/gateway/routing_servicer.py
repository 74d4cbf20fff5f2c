"""meshserve.v1.Routing on the gateway's port: translation only."""

from __future__ import annotations

from meshserve.common.grpcutil import grpc_errors, split_targets
from meshserve.common.transport import Transport
from meshserve.gateway.routing import Policy
from meshserve.gateway.routing_store import (
    BatcherPolicyStore,
    RedisPolicyStore,
    policy_from_pb,
    policy_to_pb,
)
from meshserve.gateway.traffic import PolicyStore, Router
from meshserve.pb.meshserve.v1 import routing_pb2 as rpb
from meshserve.pb.meshserve.v1 import routing_pb2_grpc as rpb_grpc

SERVICE = rpb.DESCRIPTOR.services_by_name["Routing"].full_name


def status(router: Router, model: str) -> rpb.PolicyStatus:
    policy = router.policy(model)
    out = rpb.PolicyStatus(has_policy=policy is not None,
                           alias_target=router.alias_current(model))
    if policy is not None:
        out.policy.CopyFrom(policy_to_pb(policy))
    out.stats.extend(
        rpb.RouteStats(model=m, version=v, route=r, requests=c.requests, errors=c.errors,
                       agree=c.agree, disagree=c.disagree)
        for m, v, r, c in router.stats(model)
    )
    return out


def _change(model: str, policy: Policy | None) -> rpb.PolicyChange:
    if policy is None:
        return rpb.PolicyChange(model=model, deleted=True)
    return rpb.PolicyChange(model=model, policy=policy_to_pb(policy))


class RoutingServicer(rpb_grpc.RoutingServicer):
    def __init__(self, router: Router):
        self.router = router

    @grpc_errors
    async def Get(self, request, context):
        self.router.load_config_policies()
        return status(self.router, request.model)

    @grpc_errors
    async def Set(self, request, context):
        if request.clear:
            await self.router.clear(request.policy.model)
        else:
            await self.router.set(policy_from_pb(request.policy))
        return status(self.router, request.policy.model)

    @grpc_errors
    async def Promote(self, request, context):
        await self.router.promote(request.model, request.version)
        return status(self.router, request.model)

    @grpc_errors
    async def Watch(self, request, context):
        queue = self.router.watch()
        try:
            models = [request.model] if request.model else sorted(self.router.policies)
            for model in models:
                yield _change(model, self.router.policy(model))
            while True:
                model, policy = await queue.get()
                if not request.model or model == request.model:
                    yield _change(model, policy)
        finally:
            self.router.unwatch(queue)


def policy_store(redis_url: str, batcher_target: str, transport: Transport | None = None
                 ) -> PolicyStore:
    """Where runtime policies are shared: Redis (when redis_url is set), else the (first)
    batcher's RoutingStore."""
    if redis_url:
        return RedisPolicyStore(redis_url)
    return BatcherPolicyStore(split_targets(batcher_target)[0], transport=transport)


def attach(server, router: Router) -> None:
    """Serves meshserve.v1.Routing for `router` on the gateway's server."""
    rpb_grpc.add_RoutingServicer_to_server(RoutingServicer(router), server)
