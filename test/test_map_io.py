"""save_map: formats read back by Open3D, atomic replacement, path validation."""

import os

import numpy as np
import open3d as o3d
import pytest

from ros2_stream4d.mapping import map_io
from ros2_stream4d.mapping.map_io import save_map, validate_map_path


def cloud(n=1000, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.normal(size=(n, 3)).astype(np.float32), rng.integers(0, 256, (n, 3), dtype=np.uint8),
            rng.uniform(1, 5, n).astype(np.float32))


@pytest.mark.parametrize("ext", [".ply", ".pcd", ".PLY"])
@pytest.mark.parametrize("with_conf", [True, False])
def test_files_read_back_with_open3d(tmp_path, ext, with_conf):
    xyz, rgb, conf = cloud()
    out = save_map(tmp_path / f"map{ext}", xyz, rgb, conf if with_conf else None)
    pc = o3d.io.read_point_cloud(str(out))
    np.testing.assert_allclose(np.asarray(pc.points), xyz, atol=1e-6)
    np.testing.assert_allclose(np.asarray(pc.colors), rgb / 255.0, atol=1e-6)
    assert [p.name for p in tmp_path.iterdir()] == [out.name]  # no temporary file left behind


def test_ply_header_is_binary_little_endian_with_confidence(tmp_path):
    xyz, rgb, conf = cloud(5)
    data = save_map(tmp_path / "m.ply", xyz, rgb, conf).read_bytes()
    header, body = data.split(b"end_header\n", 1)
    assert b"format binary_little_endian 1.0" in header and b"property float confidence" in header
    assert len(body) == 5 * (12 + 3 + 4)
    rec = np.frombuffer(body, dtype=[("xyz", "<f4", 3), ("rgb", "u1", 3), ("c", "<f4")])
    np.testing.assert_array_equal(rec["c"], conf)


def test_empty_cloud_is_written(tmp_path):
    out = save_map(tmp_path / "e.pcd", np.zeros((0, 3)), np.zeros((0, 3), np.uint8))
    assert b"POINTS 0" in out.read_bytes()


def test_failure_while_writing_leaves_old_file_intact(tmp_path, monkeypatch):
    target = tmp_path / "map.ply"
    xyz, rgb, _ = cloud(10)
    save_map(target, xyz, rgb)
    before = target.read_bytes()

    def exploding_write(f, header, data):
        f.write(header)
        f.write(data.tobytes()[:7])
        raise OSError("disk full")

    monkeypatch.setattr(map_io, "_write_payload", exploding_write)
    with pytest.raises(OSError, match="disk full"):
        save_map(target, *cloud(50, seed=1)[:2])
    assert target.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["map.ply"]


def test_replace_keeps_existing_file_mode(tmp_path):
    target = tmp_path / "m.pcd"
    target.write_bytes(b"old")
    os.chmod(target, 0o640)
    save_map(target, *cloud(3)[:2])
    assert (target.stat().st_mode & 0o777) == 0o640 and target.read_bytes() != b"old"


def test_path_validation(tmp_path):
    xyz, rgb, _ = cloud(3)
    with pytest.raises(ValueError, match="must end in"):
        save_map(tmp_path / "map.txt", xyz, rgb)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        save_map(tmp_path / "missing" / "map.ply", xyz, rgb)
    (tmp_path / "d.ply").mkdir()
    with pytest.raises(IsADirectoryError):
        save_map(tmp_path / "d.ply", xyz, rgb)
    with pytest.raises(ValueError, match="invalid"):
        validate_map_path("")
    if os.geteuid() != 0:  # root ignores permissions
        ro = tmp_path / "ro"
        ro.mkdir()
        os.chmod(ro, 0o500)
        with pytest.raises(PermissionError, match="not writable"):
            save_map(ro / "m.ply", xyz, rgb)


def test_root_confines_paths(tmp_path):
    root = tmp_path / "maps"
    root.mkdir()
    assert validate_map_path("a.ply", root=root) == root / "a.ply"
    with pytest.raises(PermissionError, match="outside"):
        validate_map_path("../escape.ply", root=root)
    with pytest.raises(PermissionError, match="outside"):
        validate_map_path(tmp_path / "abs.ply", root=root)
    (root / "link.ply").symlink_to(tmp_path / "elsewhere.ply")
    with pytest.raises(PermissionError, match="outside"):
        validate_map_path("link.ply", root=root)


def test_bad_arrays(tmp_path):
    with pytest.raises(ValueError, match="xyz"):
        save_map(tmp_path / "m.ply", np.zeros((3, 2)), np.zeros((3, 3), np.uint8))
    with pytest.raises(ValueError, match="rgb"):
        save_map(tmp_path / "m.ply", np.zeros((3, 3)), np.zeros((2, 3), np.uint8))
    with pytest.raises(ValueError, match="conf"):
        save_map(tmp_path / "m.ply", np.zeros((3, 3)), np.zeros((3, 3), np.uint8), np.zeros(4))
    with pytest.raises(ValueError, match="float colours"):
        save_map(tmp_path / "m.ply", np.zeros((3, 3)), np.full((3, 3), 7.0))
    assert not (tmp_path / "m.ply").exists()


def test_pcd_fields_and_confidence(tmp_path):
    xyz, rgb, conf = cloud(4)
    data = save_map(tmp_path / "m.pcd", xyz, rgb, conf).read_bytes()
    header, body = data.split(b"DATA binary\n", 1)
    assert b"FIELDS x y z rgb confidence" in header and b"POINTS 4" in header
    rec = np.frombuffer(body, dtype=[("xyz", "<f4", 3), ("rgb", "<u4"), ("c", "<f4")])
    np.testing.assert_array_equal(rec["c"], conf)
    np.testing.assert_array_equal((rec["rgb"] >> 16) & 255, rgb[:, 0])


def test_map_directory_path_validation(tmp_path):
    from ros2_stream4d.mapping.map_io import validate_map_dir_path

    assert validate_map_dir_path(tmp_path / "new_map") == tmp_path / "new_map"
    (tmp_path / "saved").mkdir()
    (tmp_path / "saved" / "metadata.json").write_text("{}")
    assert validate_map_dir_path(tmp_path / "saved") == tmp_path / "saved"
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "a.jpg").write_bytes(b"x")
    with pytest.raises(FileExistsError, match="not a saved map"):
        validate_map_dir_path(tmp_path / "photos")
    (tmp_path / "f").write_text("x")
    with pytest.raises(NotADirectoryError):
        validate_map_dir_path(tmp_path / "f")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        validate_map_dir_path(tmp_path / "missing" / "map")
    root = tmp_path / "maps"
    root.mkdir()
    assert validate_map_dir_path("site_a", root=root) == root / "site_a"
    with pytest.raises(PermissionError, match="outside"):
        validate_map_dir_path("../escape", root=root)
