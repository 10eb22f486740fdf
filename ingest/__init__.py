"""Feed adapters: HL7 v2 ORU over MLLP and DICOM MPPS, each producing StudyNotices."""
