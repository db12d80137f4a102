"""Register ros2_stream4d in an install prefix's ament index, as colcon would for an ament_python package.

Editable pip installs do not copy setup.py's data_files, so link share/ros2_stream4d/{launch,config,model,
package.xml} and the ament resource marker into PREFIX; get_package_share_directory() then works and edits
to the checkout show up at once. Idempotent.
"""
import pathlib
import sys

PACKAGE = "ros2_stream4d"
ROOT = pathlib.Path(__file__).resolve().parent.parent


def link(target: pathlib.Path, link_path: pathlib.Path) -> None:
    link_path.parent.mkdir(parents=True, exist_ok=True)
    if link_path.is_symlink() or link_path.exists():
        if link_path.is_symlink() and link_path.resolve() == target.resolve():
            return
        if link_path.is_dir() and not link_path.is_symlink():
            raise SystemExit(f"{link_path} is a real directory; remove it to let the checkout provide it")
        link_path.unlink()
    link_path.symlink_to(target)


def main(prefix: str) -> None:
    prefix_path = pathlib.Path(prefix)
    share = prefix_path / "share" / PACKAGE
    for name in ("launch", "config", "model", "package.xml"):
        link(ROOT / name, share / name)
    link(ROOT / "resource" / PACKAGE, prefix_path / "share" / "ament_index" / "resource_index" / "packages" / PACKAGE)
    print(f"install_share: {PACKAGE} registered in {prefix_path}")


if __name__ == "__main__":
    main(sys.argv[1])
