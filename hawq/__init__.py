"""hawq: Hessian-trace sensitivity and mixed-precision bit allocation."""
from hawq.allocate import Allocation, Budget, allocate, layer_bytes, pareto_frontier
from hawq.cache import AnalysisCache
from hawq.plan import (
    PlanConfig, analyse, costs_of, plan_document, read_plan, sizes_of, solve, to_gptqmodel_dynamic, write_frontier,
)
from hawq.sensitivity import LayerSensitivity, measure_sensitivities, ranking_agreement
from hawq.trace import TraceEstimate, hutchinson_traces

__all__ = [
    "AnalysisCache", "Allocation", "Budget", "allocate", "layer_bytes", "pareto_frontier", "PlanConfig", "analyse",
    "costs_of", "plan_document", "read_plan", "sizes_of", "solve", "to_gptqmodel_dynamic", "write_frontier",
    "LayerSensitivity", "measure_sensitivities", "ranking_agreement", "TraceEstimate", "hutchinson_traces",
]
