"""The daylight-factor study of lbt-recipes' daylight-factor recipe, with honeybee's own objects.

A room with a window and a sensor grid (honeybee Room.from_box), its
Radiance folder (model.to.rad_folder), the recipe's uniform sky of 100 000
lux (CertainIrradiance, as ``honeybee-radiance sky illuminance``), the
octree (Oconv of the sky and the folder's scene and aperture files, as
``octree from-folder --add-before``) and the ray trace piped to rcalc (as
``raytrace daylight-factor``: Rtrace -I -h ... | Rcalc -e '$1=(...)*17900/100000').
Every command runs through honeybee_radiance_command's ``run`` with the
Radiance folder honeybee's config points at. Shared by tests/test_shim_honeybee.py
and bench/shim.py;
the model alone (study_model) by tests/test_shim_recipe.py.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

SKY_ILLUM = 100000
DF_EXPR = f"$1=(0.265*$1+0.67*$2+0.065*$3)*17900/{SKY_ILLUM}"


def study_model(spacing: float = 0.5) -> Any:
    """The honeybee Model: a 4 x 6 x 3 m room, a window in its front wall, a sensor grid."""
    from honeybee.model import Model
    from honeybee.room import Room

    room = Room.from_box("Office", 4, 6, 3)
    room.faces[1].apertures_by_ratio(0.4)  # the front wall (y = 0)
    grid = room.properties.radiance.generate_sensor_grid(spacing, offset=0.8)
    model = Model("DaylightStudy", rooms=[room])
    model.properties.radiance.sensor_grids = [grid]
    return model


def write_study(folder: Path, spacing: float = 0.5) -> Path:
    """The model's Radiance folder and sky under ``folder``; the folder of the model."""
    from honeybee_radiance.lightsource.sky import CertainIrradiance

    model = study_model(spacing)
    model.to.rad_folder(model, folder=str(folder))
    sky = CertainIrradiance.from_illuminance(SKY_ILLUM, 0.2, True)
    sky.to_file(str(folder / "sky"), "sky.sky", True)
    return folder / "model"


def run_study(study: Path, radiance_path: Path, rad_params: str) -> list[float]:
    """Octree and daylight factors of the study folder (``study``) with honeybee's commands.

    ``radiance_path`` is what honeybee's config gets as its Radiance folder
    (its bin: the real Radiance or the shims). Returns the daylight factors.
    """
    from honeybee_radiance.config import folders
    from honeybee_radiance_command.oconv import Oconv
    from honeybee_radiance_command.options.rtrace import RtraceOptions
    from honeybee_radiance_command.rcalc import Rcalc
    from honeybee_radiance_command.rtrace import Rtrace
    from honeybee_radiance_folder import ModelFolder

    folders.radiance_path = str(radiance_path)
    env = dict(os.environ, **folders.env)
    model = ModelFolder(str(study), "model")
    scene = model.scene_files() + model.aperture_files()  # relative to the study folder
    oconv = Oconv(output="scene.oct", inputs=["sky/sky.sky", *scene])
    assert oconv.run(env=env, cwd=str(study)) == 0, "oconv failed"
    grid = next((study / "model" / "grid").glob("*.pts"))
    options = RtraceOptions()
    options.update_from_string(rad_params)
    options.update_from_string("-I -h")
    # Absolute paths, as the recipe's click arguments (resolve_path=True) give them.
    rtrace = Rtrace(options=options, octree=str(study / "scene.oct"), sensors=str(grid))
    rcalc = Rcalc(output="df.res")
    rcalc.options.e = DF_EXPR
    rtrace.pipe_to = rcalc
    assert rtrace.run(env=env, cwd=str(study)) == 0, "rtrace | rcalc failed"
    return [float(v) for v in (study / "df.res").read_text().split()]


def main(argv: list[str]) -> int:
    """``python hbstudy.py STUDY RADIANCE_PATH RAD_PARAMS``: write and run the study (a clean
    process, since honeybee's run_command changes the current directory)."""
    import time

    study, radiance_path, params = Path(argv[0]), Path(argv[1]), argv[2]
    write_study(study)
    started = time.monotonic()
    values = run_study(study, radiance_path, params)
    print(f"{len(values)} {time.monotonic() - started:.3f}")
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main(sys.argv[1:]))
