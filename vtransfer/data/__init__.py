"""Files to clips: everything between a folder of videos and a batch of uint8 frames (or optical flow).

``scan`` (find videos and classes), ``sniff`` (what a file really is),
``splits`` (stratified / grouped splits and ``split.csv``), ``categories``,
``check`` (what ``vtransfer check`` reports), ``screening`` (bad videos before
training), ``decode`` (PyAV), ``frame_cache`` (decoded frames kept in memory or
on disk), ``flow`` and ``flow_settings`` (optical flow with OpenCV, quantised
to uint8), ``flow_reader`` (flow at a clip's frames, cached like the frames),
``sampling`` (which frames a clip takes), ``spatial_crops``, ``transforms``,
``dataset`` (clip datasets), ``preprocessing`` (what a model asks of its
clips: the one thing the data wing knows of models), ``records``,
``run_data`` (a run's dataset from its options), ``clips`` (a run's clip
datasets and the shared reader), ``demo`` (the synthetic demo videos).
"""
