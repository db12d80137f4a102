"""2D occupancy: votes from a camera's points (band, floor, rays, range), the log-odds decision, the nav_msgs layout,
and that removing a frame's votes undoes them."""

import numpy as np
import pytest

from ros2_stream4d.mapping.occupancy import (
    FREE,
    OCCUPIED,
    UNKNOWN,
    OccupancyGrid,
    OccupancyOptions,
    Votes,
    frame_votes,
    grid_msg_fields,
)

OPT = OccupancyOptions(resolution=0.1, floor_z=0.0, min_height=0.1, max_height=1.5, max_range=5.0)


def wall_and_floor(x_wall=2.05, floor_to=2.0):
    """A wall at x = x_wall (y in [-0.5, 0.5], heights 0.05..2.5) and floor points in front of it."""
    y = np.linspace(-0.45, 0.45, 10)
    z = np.linspace(0.05, 2.5, 25)
    yy, zz = np.meshgrid(y, z)
    wall = np.stack([np.full(yy.size, x_wall), yy.ravel(), zz.ravel()], axis=1)
    fx, fy = np.meshgrid(np.arange(0.55, floor_to, 0.1), y)
    floor = np.stack([fx.ravel(), fy.ravel(), np.zeros(fx.size)], axis=1)
    return np.concatenate([wall, floor])


def grid_of(*votes, opt=OPT) -> tuple[np.ndarray, np.ndarray]:
    g = OccupancyGrid(opt)
    for v in votes:
        g.add(v)
    data, origin, _ = g.to_arrays(crop=False)
    return data, origin


def cell(data, origin, x, y, r=0.1):
    return data[int(np.floor((y - origin[1]) / r)), int(np.floor((x - origin[0]) / r))]


def test_wall_is_occupied_the_space_before_it_free_and_behind_it_unknown():
    cam = np.array([0.0, 0.0, 0.3])
    data, origin = grid_of(frame_votes(wall_and_floor(), cam, OPT))
    assert cell(data, origin, 2.05, 0.0) == OCCUPIED and cell(data, origin, 2.05, 0.35) == OCCUPIED
    for x in (0.05, 0.5, 1.25, 1.95):  # the ray from the camera and the floor points in front of the wall
        assert cell(data, origin, x, 0.0) == FREE, x
    assert cell(data, origin, 2.5, 0.0) == UNKNOWN and cell(data, origin, 0.0, 2.0) == UNKNOWN
    assert cell(data, origin, -1.0, 0.0) == UNKNOWN, "nothing was seen behind the camera"


def test_band_floor_ceiling_and_range():
    cam = np.zeros(3)
    pts = np.array([[1.05, 0.05, 0.05],  # floor (height <= min_height): free
                    [1.05, 1.05, 0.12],  # low obstacle in the band: occupied
                    [1.05, -1.05, 1.49],  # high in the band: occupied
                    [-2.05, 0.05, 2.0],  # ceiling: no vote, no ray
                    [7.05, 0.05, 0.5],  # beyond max_range: ignored
                    [np.nan, 0.0, 0.5]])
    v = frame_votes(pts, cam, OPT)
    occ = {tuple(c) for c in v.cells("occ")}
    free = {tuple(c) for c in v.cells("free")}
    assert occ == {(10, 10), (10, -11)}
    assert (10, 0) in free and not any(c[0] < 0 for c in free) and not any(c[0] > 10 for c in free)
    assert not (occ & free)


def test_rays_stop_one_cell_width_short_of_the_target():
    cam = np.array([0.02, 0.05, 0.5])
    v = frame_votes(np.array([[3.05, 0.05, 0.5]]), cam, OPT)
    free = v.cells("free")
    assert {tuple(c) for c in v.cells("occ")} == {(30, 0)}
    assert free[:, 0].max() == 29 and free[:, 0].min() == 0 and (free[:, 1] == 0).all()
    # a ray that grazes an obstacle's neighbour stops before it: no free vote on the obstacle's row beyond
    v2 = frame_votes(np.array([[3.05, 0.25, 0.5]]), cam, OPT)
    assert (30, 0) not in {tuple(c) for c in v2.cells("free")}


def test_log_odds_decision_and_removal():
    cam = np.array([0.05, 0.05, 0.5])
    seen = frame_votes(np.array([[1.05, 0.05, 0.5]]), cam, OPT)  # cell (10, 0) occupied
    through = frame_votes(np.array([[2.05, 0.05, 0.5]]), cam, OPT)  # crosses (10, 0): a free vote there
    g = OccupancyGrid(OPT)
    g.add(seen)
    for n_free, expect in ((1, OCCUPIED), (2, OCCUPIED), (3, FREE)):  # 0.85 * 1 - 0.4 * n
        g.add(through)
        data, origin, _ = g.to_arrays(crop=False)
        assert cell(data, origin, 1.05, 0.05) == expect, n_free
    for _ in range(3):
        g.add(through, sign=-1)
    g.add(seen, sign=-1)
    assert not g.occ.any() and not g.free.any() and not g.floor.any() and g.to_arrays()[0].size == 0


def test_layout_is_nav_msgs_row_major_from_the_lowest_y():
    g = OccupancyGrid(OPT)
    occ = np.zeros((OPT.slabs, 2, 2), bool)
    occ[3, 0, 0] = True
    free = np.zeros((OPT.slabs, 2, 2), bool)
    free[0, 0, 1] = True
    g.add(Votes(np.array([-3, 5]), occ, free, np.array([[False, False], [False, True]])))
    data, origin, res = g.to_arrays()
    np.testing.assert_allclose(origin, [-0.3, 0.5])  # lower-left corner of cell (-3, 5)
    assert data.shape == (2, 2) and res == 0.1
    assert data[0, 0] == OCCUPIED and data[0, 1] == FREE and data[1, 1] == FREE and data[1, 0] == UNKNOWN
    fields = grid_msg_fields(data, origin, res, "map")
    assert fields["info"]["width"] == 2 and fields["info"]["height"] == 2 and fields["header"]["frame_id"] == "map"
    assert fields["info"]["origin"]["position"]["x"] == pytest.approx(-0.3)
    assert list(fields["data"]) == [100, 0, -1, 0] and fields["data"].dtype == np.int8


def test_grid_grows_in_every_direction_without_losing_votes():
    g = OccupancyGrid(OPT)
    a = frame_votes(np.array([[1.05, 0.05, 0.5]]), np.array([0.05, 0.05, 0.5]), OPT)
    b = frame_votes(np.array([[-40.05, -30.05, 0.5]]), np.array([-38.05, -30.05, 0.5]), OPT)
    g.add(a)
    g.add(b)
    data, origin, _ = g.to_arrays()
    assert cell(data, origin, 1.05, 0.05) == OCCUPIED and cell(data, origin, -40.05, -30.05) == OCCUPIED


def test_a_table_top_stays_an_obstacle_when_the_floor_under_it_is_seen():
    """Evidence is compared per height slab: rays to the floor under a table pass below its top and do not clear it."""
    cam = np.array([0.05, 0.05, 0.3])
    top = np.array([[2.05, 0.05, 0.72]])  # the table top's underside, seen once from afar
    floor_under = np.array([[2.55, 0.05, 0.0], [2.05, 0.05, 0.0]])  # the floor under it, seen many times
    g = OccupancyGrid(OPT)
    g.add(frame_votes(top, cam, OPT))
    for _ in range(10):
        g.add(frame_votes(floor_under, cam, OPT))
    data, origin, _ = g.to_arrays(crop=False)
    assert cell(data, origin, 2.05, 0.05) == OCCUPIED
    assert cell(data, origin, 2.55, 0.05) == FREE and cell(data, origin, 1.05, 0.05) == FREE
    # a ray at the table top's height through its cell (a wall behind it, seen over it many times) clears it
    wall = np.array([[4.05, 0.05, 1.14]])  # the ray from 0.3 m rises to 0.72 m at x = 2.05
    for _ in range(3):
        g.add(frame_votes(wall, cam, OPT))
    data, origin, _ = g.to_arrays(crop=False)
    assert cell(data, origin, 2.05, 0.05) == FREE


def test_options_are_validated():
    with pytest.raises(ValueError, match="band"):
        OccupancyOptions(min_height=1.0, max_height=0.5)
    with pytest.raises(ValueError, match="resolution"):
        OccupancyOptions(resolution=0.0)
    with pytest.raises(ValueError, match="slab"):
        OccupancyOptions(slab_height=0.0)
    assert OccupancyOptions(min_height=0.1, max_height=1.5, slab_height=0.2).slabs == 7


def test_mesh_marker_fields_expand_triangles_with_vertex_colours():
    from ros2_stream4d.mapping.products import TRIANGLE_LIST, mesh_marker_fields

    v = np.array([[0, 0, 0], [1, 0, 0], [0, 1, 0], [1, 1, 0]], np.float32)
    f = np.array([[0, 1, 2], [1, 3, 2]])
    c = np.array([[255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 255]], np.uint8)
    (m,) = mesh_marker_fields(v, f, c)
    assert m["type"] == TRIANGLE_LIST and m["header"]["frame_id"] == "map"
    np.testing.assert_array_equal(m["points"], v[[0, 1, 2, 1, 3, 2]])
    np.testing.assert_allclose(m["colors"][:3, :3], np.eye(3)[[0, 1, 2]])
    assert (m["colors"][:, 3] == 1).all()
    parts = mesh_marker_fields(v, f, c, max_triangles=1, marker_id=7)
    assert [p["id"] for p in parts] == [7, 8] and len(parts[1]["points"]) == 3
