"""Frames in, geometry out: preprocessing, the streaming reconstructor, scale, map fusion (no rclpy).

Modules (import what you need; importing this package imports none of them):
    preprocess    Preprocessor, PixelMapping (camera pixels <-> model pixels, K, resampling)
    reconstructor StreamingReconstructor, FramePrediction, build_session / ModelBackendFactory
    conventions   model world / optical / REP-103 body frames, T_map_base, map->odom, unprojection, and the one
                  home of rotation maths (quaternions, rotation vectors, angles, slerp)
    scale         FixedScale, DepthSensorScale, OdometryScale
    gating        KeyframeGate
    cloud         frame_cloud, CloudOptions
    fusion        VoxelMap (bounded voxel hash)
    map_io        save_map (atomic PLY / PCD)
"""
