"""The one home for rotation maths (mapping/conventions.py): quaternions, rotation vectors, angles, slerp."""

import numpy as np
import pytest

from ros2_stream4d.mapping import conventions as cv


def random_rotvecs(rng, n, max_angle=np.pi):
    axis = rng.normal(size=(n, 3))
    axis /= np.linalg.norm(axis, axis=1, keepdims=True)
    return axis * rng.uniform(0, max_angle, (n, 1))


def test_rotation_vectors_round_trip_over_the_whole_range_in_batches():
    rng = np.random.default_rng(4)
    v = random_rotvecs(rng, 400).reshape(20, 20, 3)
    R = cv.rotation_from_vector(v)
    assert R.shape == (20, 20, 3, 3)
    np.testing.assert_allclose(np.swapaxes(R, -1, -2) @ R, np.broadcast_to(np.eye(3), R.shape), atol=1e-12)
    np.testing.assert_allclose(np.linalg.det(R), 1.0, atol=1e-12)
    np.testing.assert_allclose(cv.rotation_vector(R), v, atol=1e-9)
    np.testing.assert_allclose(cv.rotation_angle(R), np.linalg.norm(v, axis=-1), atol=1e-9)


@pytest.mark.parametrize("angle", [0.0, 1e-12, 1e-8, 1e-4, np.pi / 2, np.pi - 1e-4, np.pi - 1e-8, np.pi])
def test_rotation_vector_is_accurate_near_zero_and_pi(angle):
    axis = np.array([0.36, -0.48, 0.8])
    R = cv.rotation_from_vector(axis * angle)
    v = cv.rotation_vector(R)
    assert np.linalg.norm(v) == pytest.approx(angle, abs=1e-12)
    np.testing.assert_allclose(cv.rotation_from_vector(v), R, atol=1e-12)
    if 0 < angle < np.pi - 1e-6:  # at pi the axis sign is free
        np.testing.assert_allclose(v / angle, axis, atol=1e-7)


def test_quaternions_follow_ros_order_and_sign():
    rng = np.random.default_rng(8)
    R = cv.rotation_from_vector(random_rotvecs(rng, 300))
    q = cv.quaternion_from_matrix(R)
    assert q.shape == (300, 4) and (q[:, 3] >= 0).all()
    np.testing.assert_allclose(np.linalg.norm(q, axis=1), 1.0, atol=1e-12)
    np.testing.assert_allclose(cv.matrix_from_quaternion(q), R, atol=1e-12)
    np.testing.assert_allclose(cv.matrix_from_quaternion(-3.0 * q), R, atol=1e-12)  # normalised, sign-free
    # REP-103: camera_link -> optical frame is the quaternion (-0.5, 0.5, -0.5, 0.5)
    np.testing.assert_allclose(cv.quaternion_from_matrix(cv.R_BODY_OPTICAL), [-0.5, 0.5, -0.5, 0.5], atol=1e-12)
    np.testing.assert_allclose(cv.quaternion_from_matrix(cv.make_transform(t=[1, 2, 3])), [0, 0, 0, 1])
    with pytest.raises(ValueError, match="zero norm"):
        cv.matrix_from_quaternion(np.zeros((2, 4)))
    with pytest.raises(ValueError, match="NaN"):
        cv.matrix_from_quaternion([np.nan, 0, 0, 1])
    with pytest.raises(ValueError, match=r"\[\.\.\., 3, 3\]"):
        cv.quaternion_from_matrix(np.eye(2))


def test_slerp_and_transform_interpolation():
    Rz = cv.rotation_from_vector([0.0, 0.0, 1.2])
    q0, q1 = cv.quaternion_from_matrix(np.eye(3)), cv.quaternion_from_matrix(Rz)
    np.testing.assert_allclose(cv.slerp(q0, q1, 0.25), cv.quaternion_from_matrix(cv.rotation_from_vector([0, 0, 0.3])),
                               atol=1e-12)
    np.testing.assert_allclose(cv.slerp(q0, -q1, 0.5), cv.slerp(q0, q1, 0.5), atol=1e-12)  # the short way
    np.testing.assert_allclose(cv.slerp(q1, q1, 0.7), q1)
    T0 = cv.make_transform(np.eye(3), [0.0, 0.0, 0.0])
    T1 = cv.make_transform(Rz, [2.0, -4.0, 1.0])
    mid = cv.interpolate_transform(T0, T1, 0.5)
    np.testing.assert_allclose(mid[:3, 3], [1.0, -2.0, 0.5])
    np.testing.assert_allclose(mid[:3, :3], cv.rotation_from_vector([0, 0, 0.6]), atol=1e-12)
    np.testing.assert_allclose(cv.interpolate_transform(T0, T1, 1.0), T1, atol=1e-12)


def test_axis_rotations_agree_with_rotation_vectors_in_batches():
    angles = np.linspace(-3.0, 3.0, 7).reshape(7, 1)
    for rot, axis in ((cv.rot_x, 0), (cv.rot_y, 1), (cv.rot_z, 2)):
        v = np.zeros((7, 1, 3))
        v[..., axis] = angles
        R = rot(angles)
        assert R.shape == (7, 1, 3, 3)
        np.testing.assert_allclose(R, cv.rotation_from_vector(v), atol=1e-15)
    # REP-103 yaw: +90 deg about z turns x (forward) into y (left)
    np.testing.assert_allclose(cv.rot_z(np.pi / 2) @ [1.0, 0.0, 0.0], [0.0, 1.0, 0.0], atol=1e-15)


def test_rotation_angle_in_degrees_of_a_rotation_or_a_transform():
    R = cv.rotation_from_vector([0.0, 0.3, 0.0] / np.linalg.norm([0.0, 0.3, 0.0]) * np.radians(37.0))
    assert cv.rotation_angle_deg(R) == pytest.approx(37.0, abs=1e-12)
    assert cv.rotation_angle_deg(cv.make_transform(R, [5.0, 0.0, 0.0])) == pytest.approx(37.0, abs=1e-12)
    assert cv.rotation_angle_deg(cv.rotation_from_vector([1e-9, 0.0, 0.0])) == pytest.approx(np.degrees(1e-9), rel=1e-6)
