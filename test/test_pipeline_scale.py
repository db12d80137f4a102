"""Scale sources through the whole mapping pipeline: a model that is right up to scale becomes metric.

The oracle session stands in for a model whose outputs are the ground truth shrunk by a known factor (model
units); odometry (odom->base_link from the sim's ground truth) and a metric depth sensor must both recover it."""

import numpy as np
import pytest

from ros2_stream4d.codec import transform_to_matrix
from ros2_stream4d.mapping.conventions import inverse
from ros2_stream4d.mapping.pipeline import MappingPipeline, PipelineConfig, Processed
from ros2_stream4d.sim.bag import (
    TOPICS,
    SimConfig,
    iter_messages,
    read_ground_truth,
    write_sim_bag,
)
from ros2_stream4d.sim.oracle import OracleSession

SHRINK = 0.25  # model units = metres * SHRINK


@pytest.fixture(scope="module")
def ground_robot(tmp_path_factory):
    bag = tmp_path_factory.mktemp("scale") / "bag"
    write_sim_bag(bag, SimConfig(scene="room", trajectory="ground_robot", frames=30, width=64, height=48, seed=5),
                  progress=False)
    gt = read_ground_truth(bag, with_depth=True, with_images=True)
    T_base_cam = np.eye(4)  # base_link -> camera_link -> camera_optical_frame, as the bag's /tf_static says
    for _topic, _t, msg in iter_messages(bag, [TOPICS["tf_static"]]):
        for tf in msg.transforms:
            T_base_cam = T_base_cam @ transform_to_matrix(tf.transform)
    return gt, T_base_cam


def _pipeline(gt, source):
    session = OracleSession(gt.stamps, gt.T_world_cam, gt.K, gt.depths, scale=SHRINK)
    cfg = PipelineConfig(input_width=56, scale_source=source, conf_percentile=0.0)
    return MappingPipeline(cfg, session)


@pytest.mark.parametrize("source", ["odometry", "depth"])
def test_scale_source_makes_the_outputs_metric(ground_robot, source):
    gt, T_base_cam = ground_robot
    pipeline = _pipeline(gt, source)
    results = []
    for i, stamp in enumerate(gt.stamps):
        T_odom_base = gt.T_world_cam[i] @ inverse(T_base_cam)  # odom = world in the sim
        outcome = pipeline.process(gt.images[i], int(stamp), K_src=gt.K, T_base_cam=T_base_cam,
                                   T_odom_base=T_odom_base, sensor_depth=gt.depths[i])
        assert isinstance(outcome, Processed), "the gate is off: every frame is processed"
        results.append(outcome.result)
    last = results[-1]
    assert last.scale_valid
    assert last.scale == pytest.approx(1 / SHRINK, rel=0.02)
    travelled = np.linalg.norm(last.T_map_base[:3, 3])
    truth = np.linalg.norm((inverse(gt.T_world_cam[0] @ inverse(T_base_cam)) @ gt.T_world_cam[-1]
                            @ inverse(T_base_cam))[:3, 3])
    assert travelled == pytest.approx(truth, rel=0.02)
    finite = np.isfinite(last.depth) & np.isfinite(gt.depths[-1])
    assert np.median(last.depth[finite] / gt.depths[-1][finite]) == pytest.approx(1.0, rel=0.02)
